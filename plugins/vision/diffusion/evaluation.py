"""diffusion evaluation: the validation loss per timestep bucket, the fixed-seed sample grid, FID / KID and
the sample class accuracy (``objective.evaluation.*``), as a mixin of ``DiffusionObjective``.

Each validation samples a fixed-seed grid (EMA weights when on) and scores the samples with FID / KID
against ``fid_real_images`` validation images and, given ``objective.evaluation.classifier``, the
accuracy of their requested classes. Under DDP rank zero samples and the others receive its figures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.interfaces import StepOutput
from modalforge.plugins.vision.diffusion.denoisers import base_model, null_class
from modalforge.plugins.vision.diffusion.options import EvaluationOptions
from modalforge.plugins.vision.diffusion.sampling import make_grid, sample_loop


class DiffusionEvaluation:
    """Validation and sampling of ``DiffusionObjective`` (which builds the models and the helpers used here)."""

    evaluation: EvaluationOptions
    fid_net: nn.Module | None
    classifier: nn.Module | None

    def _build_evaluation(self) -> None:
        """The FID / KID feature network and metrics, and the evaluation classifier."""
        ev = self.evaluation
        if ev.samples_per_class > 0 and ev.fid_features != "none":
            from modalforge.plugins.vision.diffusion.metrics import build_fid_kid, fid_feature_network

            feature, self.fid_kind = fid_feature_network(ev.fid_features, seed=ev.seed)
            if isinstance(feature, nn.Module):
                self.fid_net = feature
            self._metrics = build_fid_kid(feature, self._num_eval_samples(), ev.fid_real_images)
        if ev.classifier:
            from modalforge.plugins.vision.diffusion.metrics import load_classifier

            if self.conditioning.kind != "class":
                raise ModalforgeError("objective.evaluation.classifier needs objective.conditioning.kind=class")
            self.classifier = load_classifier(ev.classifier)
            missing = [c for c in self.classes if c not in self.classifier.labels]
            if missing:
                raise ModalforgeError(f"objective.evaluation.classifier={ev.classifier!r} does not know the "
                                      f"classes {missing[:10]} (its labels: {self.classifier.labels[:20]})")

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any]) -> StepOutput:
        x0 = self._clean(batch)
        # The same noise and timesteps at every validation, so the curve shows the model, not the draw.
        generator = torch.Generator(device=x0.device).manual_seed(self.evaluation.seed + 7919 * (self._val_batches + 1))
        self._val_batches += 1
        weighted, mse, level = self.losses(x0, self._condition(batch), generator)
        if not self._buckets:
            self._buckets = [[0.0, 0.0] for _ in range(self.evaluation.timestep_buckets)]
        bucket = (level * self.evaluation.timestep_buckets).long().clamp(0, self.evaluation.timestep_buckets - 1)
        for b, value in zip(bucket.tolist(), mse.tolist()):
            self._buckets[b][0] += value
            self._buckets[b][1] += 1
        return StepOutput(loss=weighted.mean(), metrics={"mse": mse.mean()}, batch_size=len(x0))

    # ---- evaluation ---------------------------------------------------------------
    def _num_eval_samples(self) -> int:
        k = self.evaluation.samples_per_class
        return k * len(self.classes) if self.conditioning.kind == "class" else k * k

    def _sanity_checking(self) -> bool:
        trainer = getattr(self.datamodule, "trainer", None)
        return bool(getattr(trainer, "sanity_checking", False))

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor | float]:
        metrics: dict[str, Any] = {}
        for i, (total, count) in enumerate(self._buckets):
            if count:
                lo, hi = i / self.evaluation.timestep_buckets, (i + 1) / self.evaluation.timestep_buckets
                metrics[f"mse_t{lo:.2f}-{hi:.2f}"] = total / count
        self._buckets, self._val_batches = [], 0
        if self.evaluation.samples_per_class <= 0 or self._sanity_checking():
            return metrics
        trainer = getattr(self.datamodule, "trainer", None)
        if self._rank_zero_sampling(trainer):
            # DDP: every rank holds the same weights, so rank zero samples and scores the grid and the
            # others receive its figures (each rank logs them; the mean over ranks is the same value).
            sampled = self._sample_metrics() if trainer.is_global_zero else None
            metrics.update(trainer.strategy.broadcast(sampled, src=0))
        else:
            metrics.update(self._sample_metrics())
        return metrics

    @staticmethod
    def _rank_zero_sampling(trainer: Any) -> bool:
        """Several DDP processes. Sharded strategies (FSDP, DeepSpeed) need every rank in each forward."""
        if trainer is None or int(getattr(trainer, "world_size", 1)) <= 1:
            return False
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

        return isinstance(trainer.strategy, DDPStrategy) and not isinstance(trainer.strategy, DeepSpeedStrategy)

    def _sample_metrics(self) -> dict[str, float]:
        """Sample the fixed grid (kept for ``sample_images``) and score it: FID / KID, sample class accuracy."""
        images, requested = self.generate()
        rows = len(self.classes) if self.conditioning.kind == "class" else self.evaluation.samples_per_class
        self._grid = make_grid(images, rows)
        metrics = {k: float(v) for k, v in self._fid_kid(images).items()}
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
            real = self.datamodule.real_images(self.evaluation.fid_real_images)
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
        if self.conditioning.kind == "class":
            if class_labels is None:
                class_labels = [c for c in range(len(self.classes)) for _ in range(self.evaluation.samples_per_class)]
            requested = [self.classes[c] for c in class_labels]
        elif self.conditioning.kind == "text":
            prompts = prompts or self._prompts(n or self._num_eval_samples())
            requested = list(prompts)
        else:
            requested = [""] * (n or self._num_eval_samples())
        generator = torch.Generator(device=param.device).manual_seed(self.evaluation.seed)
        size = base_model(self.denoiser).config.sample_size
        size = size if isinstance(size, int) else size[0]
        channels = base_model(self.denoiser).config.in_channels
        was_training = self.denoiser.training
        self.denoiser.eval()
        out = []
        with self._ema_applied():
            for start in range(0, len(requested), batch_size):
                count = len(requested[start:start + batch_size])
                kwargs: dict[str, Any] = {}
                if self.conditioning.kind == "class":
                    kwargs["class_labels"] = torch.tensor(class_labels[start:start + count], device=param.device)
                    kwargs["null_labels"] = self._labels(torch.full((count,), len(self.classes), device=param.device))
                elif self.conditioning.kind == "text":
                    tokenize, chunk = self.datamodule.tokenize, prompts[start:start + count]
                    text, null = self._text(chunk, tokenize(chunk)), self._text([""] * count, tokenize([""] * count))
                    kwargs.update(text)
                    kwargs.update(null_states=null["states"], null_pooled=null["pooled"])
                elif null_class(self.denoiser) is not None:
                    kwargs["class_labels"] = torch.full((count,), null_class(self.denoiser), device=param.device)
                x = sample_loop(self.denoiser, self.sampler, (count, channels, size, size), steps=self.evaluation.sample_steps,
                                generator=generator, guidance_scale=self.evaluation.guidance_scale, **kwargs)
                if self.vae is not None:
                    x = self._vae_decode(x.to(next(self.vae.parameters()).dtype))
                out.append((x.float() / 2 + 0.5).clamp(0, 1))
        self.denoiser.train(was_training)
        return torch.cat(out), requested

    def sample_images(self) -> dict[str, torch.Tensor]:
        """The grid of the last validation: one row per class (class conditioning)."""
        return {"samples": self._grid} if self._grid is not None else {}
