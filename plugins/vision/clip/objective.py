"""clip objective: open_clip's contrastive (or SigLIP) loss, retrieval and zero-shot evaluation.

The loss is open_clip's own ``ClipLoss`` / ``SigLipLoss``, given this process's rank
and world size so features are gathered across DDP processes (each image is
contrasted with the captions of the whole global batch). The temperature is the
model's learnable ``logit_scale``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.models import build_model


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return tensor
    parts = [torch.zeros_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def recall_at_k(similarity: torch.Tensor, groups_q: torch.Tensor, groups_c: torch.Tensor, k: int) -> torch.Tensor:
    """Share of queries whose top-k candidates include one with the same caption group.

    Hand-written: identical captions (common in web data, and in the demo set) are equally
    right answers, which index-based retrieval metrics would count as misses.
    """
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    return (groups_c[top] == groups_q[:, None]).any(dim=1).float().mean()


class CLIPObjective(ModelObjective):
    """Contrastive image-text training.

    Args:
        model: the ``model`` config (builder + kwargs).
        loss: ``clip`` (symmetric InfoNCE, open_clip ``ClipLoss``) or ``siglip`` (``SigLipLoss``).
        lock_image: freeze the image tower (LiT: locked image, tuned text).
        lock_text: freeze the text tower.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, loss: str = "clip", lock_image: bool = False,
                 lock_text: bool = False) -> None:
        super().__init__(model)
        if loss not in ("clip", "siglip"):
            raise ValueError(f"objective.loss={loss!r} is not one of: clip, siglip")
        self.loss_name, self.lock_image, self.lock_text = loss, lock_image, lock_text
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]] = []
        self.hints: dict[str, Any] = {}

    # ---- building -----------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.hints = self.datamodule.model_hints() if self.datamodule is not None else {}
        config = dict(self.model_config)
        config.setdefault("siglip", self.loss_name == "siglip")
        self.model = build_model(config, self.hints)

    def _loss_fn(self) -> nn.Module:
        from open_clip.loss import ClipLoss, SigLipLoss

        rank, world = _world()
        if self.loss_name == "siglip":
            return SigLipLoss(rank=rank, world_size=world)
        return ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)

    def _text_tower(self) -> list[nn.Module]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return [m for m in (getattr(base, n, None) for n in ("transformer", "token_embedding", "ln_final"))
                if isinstance(m, nn.Module)]

    def frozen_modules(self) -> list[nn.Module]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        frozen = [base.visual] if self.lock_image else []
        if self.lock_text:
            frozen += self._text_tower()
            for name in ("text_projection", "positional_embedding"):  # parameters, not modules
                param = getattr(base, name, None)
                if isinstance(param, nn.Parameter):
                    param.requires_grad_(False)
        return frozen

    def default_adapter_targets(self) -> list[str]:
        # open_clip attention uses nn.MultiheadAttention (fused in_proj, out_proj read directly),
        # so LoRA goes on the MLP projections of every residual block of both towers.
        return ["c_fc", "c_proj"]

    def block_classes(self) -> set[type[nn.Module]]:
        from open_clip.transformer import ResidualAttentionBlock

        return {ResidualAttentionBlock}

    def fsdp_forward_methods(self) -> list[str]:
        # the steps call the towers through these, never the model's forward
        return ["encode_image", "encode_text"]

    def after_optimizer_step(self) -> None:
        # as open_clip's training loop: a temperature below 1/100 destabilises training
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    # ---- steps --------------------------------------------------------------------
    def _features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.model.encode_image(batch["images"], normalize=True),
                self.model.encode_text(batch["texts"], normalize=True))

    def _contrastive(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp()
        if self.loss_name == "siglip":
            return self._loss_fn()(image, text, scale, self.model.logit_bias)
        return self._loss_fn()(image, text, scale)

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        image, text = self._features(batch)
        loss = self._contrastive(image, text)
        with torch.no_grad():
            targets = torch.arange(len(image), device=image.device)
            acc = ((image @ text.T).argmax(1) == targets).float().mean()
        return StepOutput(loss=loss, metrics={"batch_acc": acc, "logit_scale": self.model.logit_scale.exp().detach()},
                          batch_size=len(image))

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        image, text = self._features(batch)
        self._val.append((image.detach(), text.detach(), batch["labels"], batch["texts"]))
        return StepOutput(loss=self._contrastive(image, text), batch_size=len(image))

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        if not self._val:
            return {}
        image = _gather(torch.cat([v[0] for v in self._val]))
        text = _gather(torch.cat([v[1] for v in self._val]))
        labels = _gather(torch.cat([v[2] for v in self._val]))
        tokens = _gather(torch.cat([v[3] for v in self._val]))
        self._val.clear()
        _, groups = torch.unique(tokens, dim=0, return_inverse=True)  # identical captions form one group
        similarity = image @ text.T
        metrics = {f"i2t_recall@{k}": recall_at_k(similarity, groups, groups, k) for k in (1, 5)}
        metrics |= {f"t2i_recall@{k}": recall_at_k(similarity.T, groups, groups, k) for k in (1, 5)}
        metrics["recall@1"] = (metrics["i2t_recall@1"] + metrics["t2i_recall@1"]) / 2
        if (labels >= 0).any() and self.hints.get("classnames"):
            metrics["zeroshot_acc"] = self._zeroshot(image[labels >= 0], labels[labels >= 0])
        return metrics

    @torch.no_grad()
    def _zeroshot(self, image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        tokenizer = self.datamodule.processor
        classnames, templates = self.hints["classnames"], self.hints["templates"]
        device = image.device
        weights = []
        for name in classnames:  # prompt ensembling: the mean of the normalised template embeddings
            emb = self.model.encode_text(tokenizer([t.format(name) for t in templates]).to(device), normalize=True)
            weights.append(nn.functional.normalize(emb.mean(0), dim=-1))
        predictions = (image @ torch.stack(weights).T).argmax(1)
        return (predictions == labels).float().mean()

    @torch.no_grad()
    def sample(self, inputs: list[tuple[torch.Tensor, str]]) -> list[str]:
        if not inputs:
            return []
        device = next(self.model.parameters()).device
        captions = sorted({c for _, c in inputs})
        image = self.model.encode_image(torch.stack([x for x, _ in inputs]).to(device), normalize=True)
        text = self.model.encode_text(self.datamodule.processor(captions).to(device), normalize=True)
        best = (image @ text.T).argmax(1)
        return [f"true: {c!r} -> retrieved: {captions[int(i)]!r}" for (_, c), i in zip(inputs, best)]

    # ---- saving -------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """``open_clip_model.safetensors`` + ``open_clip_config.json`` (the builder's arguments)."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(directory / "open_clip_model.safetensors"))
        config = {k: v for k, v in self.model_config.items() if k != "_target_"}
        config.update({k: self.hints.get(k) for k in ("image_size", "context_length")})
        saved: dict[str, Any] = {"builder": self.model_config.get("_target_"), "kwargs": config}
        builder = str(self.model_config.get("_target_") or "")
        if builder.endswith("clip.model.build_clip"):
            # open_clip's own loader (create_model_and_transforms('local-dir:<final>')) reads model_cfg.
            from modalforge.plugins.vision.clip.model import open_clip_model_cfg

            kwargs = {k: v for k, v in config.items() if v is not None}
            kwargs.setdefault("siglip", self.loss_name == "siglip")
            saved["model_cfg"] = open_clip_model_cfg(**kwargs)
        (directory / "open_clip_config.json").write_text(json.dumps(saved, indent=2, default=str))
