"""diffusion objective: denoising on diffusers schedulers, one switch per training choice.

``objective.prediction`` picks what the denoiser outputs: ``epsilon`` (DDPM), ``v_prediction``
(Salimans & Ho 2022), ``sample`` (x0), or ``flow`` (rectified flow / flow matching as SD3
trains it, on ``FlowMatchEulerDiscreteScheduler``). Min-SNR-gamma weighting, noise offset,
input perturbation and logit-normal timestep sampling are switches on top (see ``losses.py``).
Frozen helpers (VAE, text encoder, FID feature network, evaluation classifier) stay out of the
optimizer and the checkpoints; the EMA of the trained weights is checkpointed and used for
sampling and export. Each validation samples a fixed-seed grid, and scores the samples with
FID / KID and, given ``objective.eval_classifier``, the accuracy of their requested classes.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.interfaces import Objective, StepOutput
from modalforge.models import build_model
from modalforge.plugins.vision.diffusion import losses
from modalforge.plugins.vision.diffusion.denoisers import (base_model, block_classes_for, denoise, encode_text,
                                                         freeze_unused, null_class)
from modalforge.plugins.vision.diffusion.ema import EMAWeights
from modalforge.plugins.vision.diffusion.sampling import (Sampler, build_noise_scheduler, build_sampler, make_grid,
                                                          sample_loop)

log = logging.getLogger(__name__)
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _unwrap(module: nn.Module) -> nn.Module:
    return base_model(module)  # under torch.compile and a PEFT wrapper


class DiffusionObjective(Objective):
    """Train a diffusers denoiser.

    Args:
        model: the ``model`` config (builder + kwargs, see ``model.py``).
        conditioning: ``none``, ``class`` (the ``label`` field -> class embeddings) or ``text``
            (captions -> frozen text encoder -> cross-attention).
        prediction: ``epsilon``, ``v_prediction``, ``sample`` or ``flow``.
        beta_schedule / num_train_timesteps: the DDPM noise schedule (not used by ``flow``).
        snr_gamma: min-SNR-gamma loss weighting (5.0 in the paper); ``None`` disables.
        noise_offset: offset-noise strength (0.05-0.1 usual); 0 disables.
        input_perturbation: input-perturbation strength (0.1 in the paper); 0 disables.
        timestep_sampling: ``uniform``, ``logit_normal`` (SD3) or ``mode``; logit_mean / logit_std /
            mode_scale parameterise them.
        flow_shift: SD3's timestep shift of the flow schedule. flow_weighting: ``none``, ``sigma_sqrt``
            or ``cosmap`` (SD3's loss weightings).
        ema_decay: keep an EMA of the trained weights (e.g. 0.999); used for samples and export.
        ema_update_after_step: optimizer steps before the EMA starts.
        sampler: inference scheduler of validation grids and the export: ``auto`` (DDIM, Euler for
            flow), ``ddpm``, ``ddim``, ``dpm`` (DPM-Solver++), ``euler``.
        sample_steps / guidance_scale / sample_seed: of the validation grid (guidance needs
            ``data.caption_dropout`` > 0 in training to learn the unconditional case).
        eval_samples_per_class: samples per class (class conditioning; otherwise the grid holds this
            number squared) generated at each validation; 0 disables sampling, FID/KID and accuracy.
        timestep_buckets: validation loss is also logged per bucket of timesteps.
        fid_features: ``auto``, ``inception``, ``random``, ``none`` or an image_classification ``final/``.
        fid_real_images: validation images in the FID / KID reference set.
        eval_classifier: an image_classification run's ``final/``: logs ``sample_class_acc``.
    """

    def __init__(self, model: Mapping[str, Any] | None = None,
                 conditioning: Literal["none", "class", "text"] = "class",
                 prediction: Literal["epsilon", "v_prediction", "sample", "flow"] = "epsilon",
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2",
                 num_train_timesteps: int = 1000, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 input_perturbation: float = 0.0,
                 timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29, flow_shift: float = 1.0,
                 flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none", ema_decay: float | None = None,
                 ema_update_after_step: int = 0, sampler: Sampler = "auto", sample_steps: int = 25,
                 guidance_scale: float = 1.0, sample_seed: int = 0, eval_samples_per_class: int = 6,
                 timestep_buckets: int = 4, fid_features: str = "auto", fid_real_images: int = 360,
                 eval_classifier: str | None = None) -> None:
        super().__init__(model)
        choices = {"conditioning": (conditioning, ("none", "class", "text")),
                   "prediction": (prediction, ("epsilon", "v_prediction", "sample", "flow")),
                   "timestep_sampling": (timestep_sampling, ("uniform", "logit_normal", "mode")),
                   "flow_weighting": (flow_weighting, ("none", "sigma_sqrt", "cosmap"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ModalforgeError(f"objective.{key}={value!r} is not one of: {', '.join(allowed)}")
        if snr_gamma is not None and prediction == "flow":
            raise ModalforgeError("objective.snr_gamma (min-SNR weighting) is defined for the DDPM predictions; "
                                  "with prediction=flow use objective.flow_weighting (sigma_sqrt, cosmap)")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ModalforgeError(f"objective.ema_decay={ema_decay} must be in (0, 1) (or null to disable)")
        self.conditioning, self.prediction = conditioning, prediction
        self.beta_schedule, self.num_train_timesteps = beta_schedule, num_train_timesteps
        self.snr_gamma, self.noise_offset, self.input_perturbation = snr_gamma, noise_offset, input_perturbation
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.flow_shift, self.flow_weighting = flow_shift, flow_weighting
        self.ema_decay, self.ema_update_after_step = ema_decay, ema_update_after_step
        self.sampler_name, self.sample_steps, self.guidance_scale = sampler, sample_steps, guidance_scale
        self.sample_seed, self.eval_samples_per_class = sample_seed, eval_samples_per_class
        self.timestep_buckets, self.fid_features, self.fid_real_images = timestep_buckets, fid_features, fid_real_images
        self.eval_classifier_path = eval_classifier
        self.denoiser: nn.Module | None = None
        self.vae: nn.Module | None = None
        self.text_encoder: nn.Module | None = None
        self.fid_net: nn.Module | None = None
        self.classifier: nn.Module | None = None
        self.ema: EMAWeights | None = None
        self.classes: list[str] = []
        self.source: str | None = None
        self._metrics: dict[str, Any] = {}  # torchmetrics FID/KID, kept out of the module tree (and checkpoints)
        self._buckets: list[list[float]] = []
        self._val_batches = 0
        self._grid: torch.Tensor | None = None

    # ---- building -----------------------------------------------------------------
    def configure_model(self) -> None:
        if self.denoiser is not None:
            return
        dm = self.datamodule
        hints: dict[str, Any] = dict(dm.model_hints()) if dm is not None else {}
        data_conditioning = hints.get("conditioning", self.conditioning)
        if data_conditioning != self.conditioning:
            raise ModalforgeError(f"data.conditioning={data_conditioning} but objective.conditioning="
                                  f"{self.conditioning}; set both (data.conditioning defaults to the objective's)")
        hints["conditioning"] = self.conditioning
        hints["tokenizer"] = getattr(dm, "processor", None)
        models = build_model(self.model_config, hints)
        self.denoiser, self.vae, self.text_encoder, self.source = (models.denoiser, models.vae, models.text_encoder,
                                                                   models.source)
        if models.tokenizer is not None and dm is not None:
            dm.use_tokenizer(models.tokenizer)
        self.classes = list(getattr(dm, "classes", []) or [])
        self.noise_scheduler = build_noise_scheduler(self.prediction, num_train_timesteps=self.num_train_timesteps,
                                                     beta_schedule=self.beta_schedule, flow_shift=self.flow_shift,
                                                     pretrained=models.scheduler_config)
        self.sampler = build_sampler(self.sampler_name, self.noise_scheduler, self.prediction)
        if getattr(dm, "cache_latents", False):
            if self.vae is None:
                raise ModalforgeError("data.cache_latents=true needs a VAE (model.vae, or a pipeline with one in "
                                      "model.name_or_path); this model works in pixel space")
            dm.attach_latents(self._vae_encode, self._vae_key())
        if self.eval_samples_per_class > 0 and self.fid_features != "none":
            from modalforge.plugins.vision.diffusion.metrics import build_fid_kid, fid_feature_network

            feature, self.fid_kind = fid_feature_network(self.fid_features, seed=self.sample_seed)
            if isinstance(feature, nn.Module):
                self.fid_net = feature
            n_fake = self._num_eval_samples()
            self._metrics = build_fid_kid(feature, n_fake, self.fid_real_images)
        if self.eval_classifier_path:
            from modalforge.plugins.vision.diffusion.metrics import load_classifier

            if self.conditioning != "class":
                raise ModalforgeError("objective.eval_classifier needs objective.conditioning=class")
            self.classifier = load_classifier(self.eval_classifier_path)
            missing = [c for c in self.classes if c not in self.classifier.labels]
            if missing:
                raise ModalforgeError(f"objective.eval_classifier={self.eval_classifier_path!r} does not know the "
                                      f"classes {missing[:10]} (its labels: {self.classifier.labels[:20]})")

    def set_adapter_target(self, module: nn.Module) -> None:
        if self.ema is not None and self.denoiser is not None and module is not self.denoiser:
            # The core merges a PEFT adapter before export; the merged weights are the trained ones,
            # and the EMA of the LoRA weights no longer maps onto them.
            log.warning("diffusion: the EMA of the LoRA weights is not applied to a merged export; "
                        "checkpoint.export_merged=false saves the adapter")
            self.ema = None
        self.denoiser = module
        freeze_unused(module)  # after the adapter, which may have set requires_grad on everything
        if self.ema_decay is not None and self.ema is None:
            # After the adapter: under LoRA the EMA follows the LoRA weights only.
            self.ema = EMAWeights(self._trained_params(), self.ema_decay, self.ema_update_after_step)

    def adapter_target(self) -> nn.Module:
        return self.denoiser

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.vae, self.text_encoder, self.fid_net, self.classifier) if m is not None]

    def default_adapter_targets(self) -> list[str]:
        return ATTENTION_TARGETS

    def block_classes(self) -> set[type[nn.Module]]:
        """DiT's ``BasicTransformerBlock`` / SD3's ``JointTransformerBlock`` (none for a UNet)."""
        return block_classes_for(self.model_config)

    def _trained_params(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.step(self._trained_params())

    def _ema_applied(self) -> Any:
        return self.ema.applied(self._trained_params()) if self.ema is not None else nullcontext()

    # ---- encoding -----------------------------------------------------------------
    def _vae_key(self) -> str:
        config = dict(self.vae.config)
        weights = sum(float(p.double().sum()) for p in list(self.vae.parameters())[:4])
        return json.dumps({"source": self.source, "config": config, "weights": weights}, sort_keys=True, default=str)

    @torch.no_grad()
    def _vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist.sample()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample

    def _clean(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"]
        return self._vae_encode(batch["pixel_values"]) if self.vae is not None else batch["pixel_values"]

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        # The data's null class is the index after its classes; the denoiser's may sit elsewhere (a pretrained DiT).
        null = null_class(self.denoiser)
        if null is None or null == len(self.classes):
            return labels
        return torch.where(labels == len(self.classes), torch.full_like(labels, null), labels)

    @torch.no_grad()
    def _text(self, captions: list[str], input_ids: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        states, pooled = encode_text(self.text_encoder, captions, input_ids)
        param = next(self.denoiser.parameters())
        return {"states": states.to(param.dtype), "pooled": pooled.to(param.dtype) if pooled is not None else None}

    def _condition(self, batch: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        if self.conditioning == "class":
            return {"class_labels": self._labels(batch["labels"])}
        if self.conditioning == "text":
            return self._text(batch["captions"], batch.get("input_ids"))
        null = null_class(self.denoiser)
        if null is not None:  # a class-conditional denoiser (DiT) trained unconditionally: always the null class
            return {"class_labels": torch.full((len(batch["captions"]),), null, dtype=torch.long)}
        return {}

    # ---- the loss -----------------------------------------------------------------
    def _timestep_fractions(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        return losses.timestep_fractions(self.timestep_sampling, n, logit_mean=self.logit_mean,
                                         logit_std=self.logit_std, mode_scale=self.mode_scale, device=device,
                                         generator=generator)

    def losses(self, x0: torch.Tensor, condition: dict[str, torch.Tensor],
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example (weighted loss, plain MSE, noise level in [0, 1]) for clean inputs ``x0``."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        noise = losses.offset_noise(noise, self.noise_offset, generator)
        model_noise = losses.perturb_noise(noise, self.input_perturbation, generator)
        n, schedule = len(x0), self.noise_scheduler
        fractions = self._timestep_fractions(n, x0.device, generator)
        indices = (fractions * schedule.config.num_train_timesteps).long().clamp(0, schedule.config.num_train_timesteps - 1)
        if self.prediction == "flow":
            timesteps = schedule.timesteps.to(x0.device)[indices]
            sigmas = schedule.sigmas.to(x0.device, x0.dtype)[indices]
            noisy, target = losses.flow_interpolate(x0, model_noise, sigmas)
            target = noise - x0
            weights = losses.flow_weights(self.flow_weighting, sigmas)
            level = sigmas
        else:
            timesteps = indices
            noisy = schedule.add_noise(x0, model_noise, timesteps)
            target = losses.ddpm_target(schedule, self.prediction, x0, noise, timesteps)
            if self.snr_gamma is not None:
                from diffusers.training_utils import compute_snr

                weights = losses.min_snr_weights(compute_snr(schedule, timesteps), self.snr_gamma, self.prediction)
            else:
                weights = torch.ones(n, device=x0.device)
            level = timesteps.float() / schedule.config.num_train_timesteps
        condition = {k: (v.to(x0.device) if v is not None else None) for k, v in condition.items()}
        pred = denoise(self.denoiser, noisy, timesteps, **condition)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        return mse * weights.float().view(-1), mse, level

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        x0 = self._clean(batch)
        weighted, mse, _ = self.losses(x0, self._condition(batch))
        return StepOutput(loss=weighted.mean(), metrics={"mse": mse.mean().detach()}, batch_size=len(x0))

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> StepOutput:
        x0 = self._clean(batch)
        # The same noise and timesteps at every validation, so the curve shows the model, not the draw.
        generator = torch.Generator(device=x0.device).manual_seed(self.sample_seed + 7919 * (self._val_batches + 1))
        self._val_batches += 1
        weighted, mse, level = self.losses(x0, self._condition(batch), generator)
        if not self._buckets:
            self._buckets = [[0.0, 0.0] for _ in range(self.timestep_buckets)]
        bucket = (level * self.timestep_buckets).long().clamp(0, self.timestep_buckets - 1)
        for b, value in zip(bucket.tolist(), mse.tolist()):
            self._buckets[b][0] += value
            self._buckets[b][1] += 1
        return StepOutput(loss=weighted.mean(), metrics={"mse": mse.mean()}, batch_size=len(x0))

    # ---- evaluation ---------------------------------------------------------------
    def _num_eval_samples(self) -> int:
        k = self.eval_samples_per_class
        return k * len(self.classes) if self.conditioning == "class" else k * k

    def _sanity_checking(self) -> bool:
        trainer = getattr(self.datamodule, "trainer", None)
        return bool(getattr(trainer, "sanity_checking", False))

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor | float]:
        metrics: dict[str, Any] = {}
        for i, (total, count) in enumerate(self._buckets):
            if count:
                lo, hi = i / self.timestep_buckets, (i + 1) / self.timestep_buckets
                metrics[f"mse_t{lo:.2f}-{hi:.2f}"] = total / count
        self._buckets, self._val_batches = [], 0
        if self.eval_samples_per_class <= 0 or self._sanity_checking():
            return metrics
        images, requested = self.generate()
        rows = len(self.classes) if self.conditioning == "class" else self.eval_samples_per_class
        self._grid = make_grid(images, rows)
        metrics.update(self._fid_kid(images))
        if self.classifier is not None:
            predicted = self.classifier.logits(images.to(next(self.classifier.parameters()).device)).argmax(-1)
            names = [self.classifier.labels[int(i)] for i in predicted]
            metrics["sample_class_acc"] = sum(a == b for a, b in zip(names, requested)) / max(len(names), 1)
        return metrics

    def _fid_kid(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._metrics or len(images) < 2:
            return {}
        device = images.device
        fid, kid = self._metrics["fid"].to(device), self._metrics["kid"].to(device)
        if not getattr(self, "_real_done", False):
            real = self.datamodule.real_images(self.fid_real_images)
            for start in range(0, len(real), 64):
                chunk = real[start:start + 64].to(device)
                fid.update(chunk, real=True)
                kid.update(chunk, real=True)
            self._real_done = True
        fid.update(images, real=False)
        kid.update(images, real=False)
        out = {"fid": fid.compute().float(), "kid": kid.compute()[0].float()}
        fid.reset()
        kid.reset()
        return out

    def _prompts(self, n: int) -> list[str]:
        prompts = self.datamodule.sample_inputs(n) if self.datamodule is not None else []
        return (prompts * (n // max(len(prompts), 1) + 1))[:n] if prompts else [""] * n

    @torch.no_grad()
    def generate(self, n: int | None = None, class_labels: list[int] | None = None,
                 prompts: list[str] | None = None, batch_size: int = 64) -> tuple[torch.Tensor, list[str]]:
        """Fixed-seed samples in ``[0, 1]`` (EMA weights when on) and the condition each was asked for."""
        param = next(self.denoiser.parameters())
        if self.conditioning == "class":
            if class_labels is None:
                class_labels = [c for c in range(len(self.classes)) for _ in range(self.eval_samples_per_class)]
            requested = [self.classes[c] for c in class_labels]
        elif self.conditioning == "text":
            prompts = prompts or self._prompts(n or self._num_eval_samples())
            requested = list(prompts)
        else:
            requested = [""] * (n or self._num_eval_samples())
        generator = torch.Generator(device=param.device).manual_seed(self.sample_seed)
        size = _unwrap(self.denoiser).config.sample_size
        size = size if isinstance(size, int) else size[0]
        channels = _unwrap(self.denoiser).config.in_channels
        was_training = self.denoiser.training
        self.denoiser.eval()
        out = []
        with self._ema_applied():
            for start in range(0, len(requested), batch_size):
                count = len(requested[start:start + batch_size])
                kwargs: dict[str, Any] = {}
                if self.conditioning == "class":
                    kwargs["class_labels"] = torch.tensor(class_labels[start:start + count], device=param.device)
                    kwargs["null_labels"] = self._labels(torch.full((count,), len(self.classes), device=param.device))
                elif self.conditioning == "text":
                    tokenize, chunk = self.datamodule.tokenize, prompts[start:start + count]
                    text, null = self._text(chunk, tokenize(chunk)), self._text([""] * count, tokenize([""] * count))
                    kwargs.update(text)
                    kwargs.update(null_states=null["states"], null_pooled=null["pooled"])
                elif null_class(self.denoiser) is not None:
                    kwargs["class_labels"] = torch.full((count,), null_class(self.denoiser), device=param.device)
                x = sample_loop(self.denoiser, self.sampler, (count, channels, size, size), steps=self.sample_steps,
                                generator=generator, guidance_scale=self.guidance_scale, **kwargs)
                if self.vae is not None:
                    x = self._vae_decode(x.to(next(self.vae.parameters()).dtype))
                out.append((x.float() / 2 + 0.5).clamp(0, 1))
        self.denoiser.train(was_training)
        return torch.cat(out), requested

    def sample_images(self) -> dict[str, torch.Tensor]:
        """The grid of the last validation: one row per class (class conditioning)."""
        return {"samples": self._grid} if self._grid is not None else {}

    # ---- saving -------------------------------------------------------------------
    def export_pipeline(self) -> Any:
        """A diffusers pipeline of the trained denoiser (EMA weights applied by the caller) and its helpers."""
        import copy

        from diffusers import DDPMPipeline, DiTPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

        from modalforge.plugins.vision.diffusion.denoisers import PipelinePromptEncoder

        denoiser = copy.deepcopy(_unwrap(self.denoiser))
        if hasattr(denoiser, "merge_and_unload"):
            denoiser = denoiser.merge_and_unload()
        scheduler = copy.deepcopy(self.sampler)
        kind = type(denoiser).__name__
        if kind == "DiTTransformer2DModel" and self.vae is not None:
            id2label = {i: name for i, name in enumerate(self.classes)} or None
            return DiTPipeline(transformer=denoiser, vae=self.vae, scheduler=scheduler, id2label=id2label)
        if kind == "SD3Transformer2DModel" and isinstance(self.text_encoder, PipelinePromptEncoder):
            parts = {k: v for k, v in self.text_encoder.pipe.components.items()
                     if k not in ("transformer", "scheduler", "vae")}
            return StableDiffusion3Pipeline(transformer=denoiser, vae=self.vae, scheduler=scheduler, **parts)
        if kind.startswith("UNet") and self.vae is None and self.text_encoder is None:
            return DDPMPipeline(unet=denoiser, scheduler=scheduler)
        if kind.startswith("UNet") and self.vae is not None and self.text_encoder is not None:
            return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                           tokenizer=self.datamodule.processor, unet=denoiser, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        raise NotImplementedError  # handled by save_pretrained

    def save_pretrained(self, directory: str | Path) -> None:
        """A diffusers pipeline folder: ``DDPMPipeline`` in pixel space (unconditional or class-conditional
        UNet), ``StableDiffusionPipeline`` with a VAE and a text encoder, ``DiTPipeline`` (DiT with a VAE),
        ``StableDiffusion3Pipeline`` (SD3 from a pipeline); otherwise each component in its sub-folder
        (``unet/`` or ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._ema_applied():
            try:
                self.export_pipeline().save_pretrained(str(directory))
                return
            except NotImplementedError:
                pass
            denoiser = _unwrap(self.denoiser)
            sub = "unet" if type(denoiser).__name__.startswith("UNet") else "transformer"
            denoiser.save_pretrained(str(directory / sub))
        self.sampler.save_pretrained(str(directory / "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(str(directory / "vae"))
        if self.text_encoder is not None and hasattr(self.text_encoder, "save_pretrained"):
            self.text_encoder.save_pretrained(str(directory / "text_encoder"))
            self.datamodule.processor.save_pretrained(str(directory / "tokenizer"))

    def save_artifacts(self, directory: str | Path) -> None:
        """``labels.json`` (class index -> name; the null class of guidance is the index after the last),
        the last validation grid as ``samples.png``, and, beside an unmerged LoRA adapter, the same
        LoRA (EMA weights when on) as ``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights``."""
        from modalforge.plugins.vision.diffusion.lora_export import is_peft, save_diffusers_lora

        directory = Path(directory)
        if self.conditioning == "class":
            (directory / "labels.json").write_text(json.dumps(self.classes, indent=1))
        if self._grid is not None:
            from torchvision.utils import save_image

            save_image(self._grid, str(directory / "samples.png"))
        denoiser = getattr(self.denoiser, "_orig_mod", self.denoiser)
        if is_peft(denoiser) and (directory / "adapter_config.json").exists():
            with self._ema_applied():
                if self.ema is not None:
                    denoiser.save_pretrained(str(directory))  # the PEFT adapter again, with the EMA weights
                written = save_diffusers_lora(denoiser, directory)
            if written is None:
                log.info("diffusion: no diffusers LoRA loader for %s; final/ holds the PEFT adapter only",
                         type(denoiser.get_base_model()).__name__)
