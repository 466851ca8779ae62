"""diffusion objective: denoising on diffusers schedulers, in typed option groups (``options.py``).

``objective.schedule.prediction_type`` picks what the denoiser outputs: ``epsilon`` (DDPM),
``v_prediction`` (Salimans & Ho 2022), ``sample`` (x0), or ``flow`` (rectified flow / flow matching as
SD3 trains it, on ``FlowMatchEulerDiscreteScheduler``). Min-SNR-gamma weighting, noise offset, input
perturbation (``objective.loss``) and logit-normal timestep sampling (``objective.schedule``) are
switches on top (see ``losses.py``). Frozen helpers (VAE, text encoder, FID feature network,
evaluation classifier) stay out of the optimizer and the checkpoints; the EMA of the trained weights
(``objective.ema``) is checkpointed and used for sampling and export. Validation sampling and its
scores live in ``evaluation.py``, ``final/`` in ``export.py``.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from modalforge.errors import ConfigError, ModalforgeError
from modalforge.interfaces import Objective, StepOutput
from modalforge.models import build_model
from modalforge.plugins.vision.diffusion import losses
from modalforge.plugins.vision.diffusion.denoisers import block_classes_for, denoise, encode_text, freeze_unused, null_class
from modalforge.plugins.vision.diffusion.ema import EMAWeights
from modalforge.plugins.vision.diffusion.evaluation import DiffusionEvaluation
from modalforge.plugins.vision.diffusion.export import DiffusionExport
from modalforge.plugins.vision.diffusion.options import (ConditioningOptions, EMAOptions, EvaluationOptions, LossOptions,
                                                         PriorOptions, ScheduleOptions, option_group)
from modalforge.plugins.vision.diffusion.sampling import build_noise_scheduler, build_sampler

log = logging.getLogger(__name__)
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class DiffusionObjective(DiffusionEvaluation, DiffusionExport, Objective):
    """Train a diffusers denoiser.

    Args:
        model: the ``model`` config (builder + kwargs, see ``model.py``).
        conditioning: ``objective.conditioning.*`` (:class:`~.options.ConditioningOptions`): kind, caption_dropout.
        schedule: ``objective.schedule.*`` (:class:`~.options.ScheduleOptions`): prediction_type, the noise
            schedule, timestep sampling.
        loss: ``objective.loss.*`` (:class:`~.options.LossOptions`): snr_gamma, flow_weighting, noise_offset,
            input_perturbation.
        ema: ``objective.ema.*`` (:class:`~.options.EMAOptions`): decay, update_after_step.
        evaluation: ``objective.evaluation.*`` (:class:`~.options.EvaluationOptions`): the validation grid,
            its sampler (also the export's scheduler), FID / KID and the sample classifier.
        prior: ``objective.prior.*`` (:class:`~.options.PriorOptions`): DreamBooth prior preservation.

    Each group is an options dataclass or a mapping of its fields (as the config gives it).
    """

    def __init__(self, model: Mapping[str, Any] | None = None,
                 conditioning: ConditioningOptions | Mapping[str, Any] | None = None,
                 schedule: ScheduleOptions | Mapping[str, Any] | None = None,
                 loss: LossOptions | Mapping[str, Any] | None = None,
                 ema: EMAOptions | Mapping[str, Any] | None = None,
                 evaluation: EvaluationOptions | Mapping[str, Any] | None = None,
                 prior: PriorOptions | Mapping[str, Any] | None = None) -> None:
        super().__init__(model)
        self.conditioning = option_group(ConditioningOptions, conditioning, "conditioning")
        self.schedule = option_group(ScheduleOptions, schedule, "schedule")
        self.loss = option_group(LossOptions, loss, "loss")
        self.ema_options = option_group(EMAOptions, ema, "ema")
        self.evaluation = option_group(EvaluationOptions, evaluation, "evaluation")
        self.prior = option_group(PriorOptions, prior, "prior")
        if self.loss.snr_gamma is not None and self.schedule.prediction_type == "flow":
            raise ConfigError("min-SNR weighting is defined for the DDPM predictions; with "
                              "objective.schedule.prediction_type=flow use objective.loss.flow_weighting "
                              "(sigma_sqrt, cosmap)", where="objective.loss.snr_gamma")
        if self.prior.loss_weight and self.conditioning.kind != "text":
            raise ConfigError("DreamBooth prior preservation pairs class images with objective.prior.class_prompt; "
                              "it needs objective.conditioning.kind=text", where="objective.prior.loss_weight")
        self._class_set: Any = None
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
        dm, kind, schedule = self.datamodule, self.conditioning.kind, self.schedule
        hints: dict[str, Any] = dict(dm.model_hints()) if dm is not None else {}
        data_conditioning = hints.get("conditioning", kind)
        if data_conditioning != kind:
            raise ModalforgeError(f"data.conditioning={data_conditioning} but objective.conditioning.kind={kind}; "
                                  "set both (data.conditioning defaults to the objective's)")
        hints["conditioning"] = kind
        hints["tokenizer"] = getattr(dm, "processor", None)
        models = build_model(self.model_config, hints)
        self.denoiser, self.vae, self.text_encoder, self.source = (models.denoiser, models.vae, models.text_encoder,
                                                                   models.source)
        if models.tokenizer is not None and dm is not None:
            dm.use_tokenizer(models.tokenizer)
        self.classes = list(getattr(dm, "classes", []) or [])
        self.noise_scheduler = build_noise_scheduler(schedule.prediction_type,
                                                     num_train_timesteps=schedule.num_train_timesteps,
                                                     beta_schedule=schedule.beta_schedule, flow_shift=schedule.flow_shift,
                                                     pretrained=models.scheduler_config)
        self.sampler = build_sampler(self.evaluation.sampler, self.noise_scheduler, schedule.prediction_type)
        if getattr(dm, "cache_latents", False):
            if self.vae is None:
                raise ModalforgeError("data.cache_latents=true needs a VAE (model.vae, or a pipeline with one in "
                                      "model.name_or_path); this model works in pixel space")
            dm.attach_latents(self._vae_encode, self._vae_key())
        self._build_evaluation()

    def set_adapter_target(self, module: nn.Module) -> None:
        if self.ema is not None and self.denoiser is not None and module is not self.denoiser:
            # The core merges a PEFT adapter before export; the merged weights are the trained ones,
            # and the EMA of the LoRA weights no longer maps onto them.
            log.warning("diffusion: the EMA of the LoRA weights is not applied to a merged export; "
                        "checkpoint.export_merged=false saves the adapter")
            self.ema = None
        self.denoiser = module
        freeze_unused(module)  # after the adapter, which may have set requires_grad on everything
        if self.ema_options.decay is not None and self.ema is None:
            # After the adapter: under LoRA the EMA follows the LoRA weights only.
            self.ema = EMAWeights(self._trained_params(), self.ema_options.decay,
                                  self.ema_options.update_after_step)

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
        if self.conditioning.kind == "class":
            return {"class_labels": self._labels(batch["labels"])}
        if self.conditioning.kind == "text":
            return self._text(batch["captions"], batch.get("input_ids"))
        null = null_class(self.denoiser)
        if null is not None:  # a class-conditional denoiser (DiT) trained unconditionally: always the null class
            return {"class_labels": torch.full((len(batch["captions"]),), null, dtype=torch.long)}
        return {}

    # ---- the loss -----------------------------------------------------------------
    def _timestep_fractions(self, n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        return losses.timestep_fractions(self.schedule.timestep_sampling, n, logit_mean=self.schedule.logit_mean,
                                         logit_std=self.schedule.logit_std, mode_scale=self.schedule.mode_scale,
                                         device=device, generator=generator)

    def losses(self, x0: torch.Tensor, condition: dict[str, torch.Tensor],
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example (weighted loss, plain MSE, noise level in [0, 1]) for clean inputs ``x0``."""
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        noise = losses.offset_noise(noise, self.loss.noise_offset, generator)
        model_noise = losses.perturb_noise(noise, self.loss.input_perturbation, generator)
        n, schedule = len(x0), self.noise_scheduler
        fractions = self._timestep_fractions(n, x0.device, generator)
        indices = (fractions * schedule.config.num_train_timesteps).long().clamp(0, schedule.config.num_train_timesteps - 1)
        if self.schedule.prediction_type == "flow":
            timesteps = schedule.timesteps.to(x0.device)[indices]
            sigmas = schedule.sigmas.to(x0.device, x0.dtype)[indices]
            noisy, target = losses.flow_interpolate(x0, model_noise, sigmas)
            target = noise - x0
            weights = losses.flow_weights(self.loss.flow_weighting, sigmas)
            level = sigmas
        else:
            timesteps = indices
            noisy = schedule.add_noise(x0, model_noise, timesteps)
            target = losses.ddpm_target(schedule, self.schedule.prediction_type, x0, noise, timesteps)
            if self.loss.snr_gamma is not None:
                from diffusers.training_utils import compute_snr

                weights = losses.min_snr_weights(compute_snr(schedule, timesteps), self.loss.snr_gamma,
                                                 self.schedule.prediction_type)
            else:
                weights = torch.ones(n, device=x0.device)
            level = timesteps.float() / schedule.config.num_train_timesteps
        condition = {k: (v.to(x0.device) if v is not None else None) for k, v in condition.items()}
        pred = denoise(self.denoiser, noisy, timesteps, **condition)
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
        return mse * weights.float().view(-1), mse, level

    def drop_conditions(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``objective.conditioning.caption_dropout``: each training example's condition dropped (caption ->
        ``""``, label -> the null class) with that probability, so classifier-free guidance can sample without it.

        Drawn here, from the torch generator, which differs by rank and which every checkpoint holds
        (``callbacks/rng_state.py``), so a resumed run drops what the uninterrupted one dropped. Not in
        the data's collate: that may run in worker processes, whose generators no checkpoint holds, and
        it drew from a ``random.Random(seed)`` of its own, the same on every rank and restarted by a resume."""
        p = float(self.conditioning.caption_dropout or 0.0)
        if p <= 0 or self.conditioning.kind == "none":
            return batch
        drop = torch.rand(len(batch["captions"])) < p
        if not drop.any():
            return batch
        batch = dict(batch)
        batch["captions"] = ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]
        labels = batch["labels"]
        batch["labels"] = torch.where(drop.to(labels.device), torch.full_like(labels, len(self.classes)), labels)
        if batch.get("input_ids") is not None:
            ids = batch["input_ids"]
            empty = self.datamodule.tokenize([""]).to(ids.device, ids.dtype)
            batch["input_ids"] = torch.where(drop.to(ids.device)[:, None], empty, ids)
        return batch

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        batch = self.drop_conditions(batch)
        if self.prior.loss_weight > 0:
            return self._dreambooth_step(batch)
        x0 = self._clean(batch)
        weighted, mse, _ = self.losses(x0, self._condition(batch))
        return StepOutput(loss=weighted.mean(), metrics={"mse": mse.mean().detach()}, batch_size=len(x0))

    # ---- DreamBooth prior preservation ------------------------------------------------------
    def _class_images(self) -> Any:
        """The class images, generated first (rank zero; the others wait) where fewer than asked exist."""
        if self._class_set is None:
            from modalforge.plugins.vision.diffusion.prior import load_class_images

            def generate(n: int) -> torch.Tensor:
                return self.generate(prompts=[self.prior.class_prompt] * n)[0]

            self._class_set = load_class_images(self.prior.class_data_dir, self.prior.num_class_images,
                                                int(self.datamodule.image_size), generate)
        return self._class_set

    def _dreambooth_step(self, batch: dict[str, Any]) -> StepOutput:
        """Instance examples then as many class examples in one denoiser call, as train_dreambooth.py."""
        x0 = self._clean(batch)
        n = len(x0)
        pixels = self._class_images().take(n).to(x0.device)
        class_x0 = self._vae_encode(pixels).to(x0.dtype) if self.vae is not None else pixels.to(x0.dtype)
        prompts = [self.prior.class_prompt] * n
        instance, prior = self._condition(batch), self._text(prompts, self.datamodule.tokenize(prompts))
        condition = {k: torch.cat([v.to(prior[k].device), prior[k]]) if v is not None and prior[k] is not None
                     else None for k, v in instance.items()}
        weighted, mse, _ = self.losses(torch.cat([x0, class_x0]), condition)
        loss, instance_loss, prior_loss = losses.prior_preservation_loss(weighted, mse, n, self.prior.loss_weight)
        return StepOutput(loss=loss, metrics={"mse": mse[:n].mean().detach(), "instance_loss": instance_loss.detach(),
                                              "prior_loss": prior_loss.detach()}, batch_size=n)

