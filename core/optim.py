"""Optimizer over trainable parameters only, and warmup + decay learning-rate schedules.

Weight decay is never applied to biases, normalisation weights or other 1-D
parameters (the GPT-2/LLaMA convention); frozen parameters never reach the
optimizer, so frozen helpers cost no optimizer memory.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

_NO_DECAY_NAME_PARTS = ("bias", "norm", "ln_", "layernorm", "embeddings.position")


def parameter_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decay / no-decay groups."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.ndim < 2 or any(part in lowered for part in _NO_DECAY_NAME_PARTS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters: the adapter froze everything (check adapter.trainable / target_modules)")
    return groups


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW (default), SGD, or bitsandbytes' 8-bit AdamW from the ``optim`` config."""
    groups = parameter_groups(named_params, float(cfg.get("weight_decay", 0.0)))
    name = cfg.get("name", "adamw")
    lr = float(cfg["lr"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=float(cfg.get("eps", 1e-8)))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)))
    if name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))))
    raise ValueError(f"optim.name={name!r} is not one of: adamw, sgd, adamw_8bit")


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warmup, then decay)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    raise ValueError(f"optim.scheduler={schedule!r} is not one of: cosine, linear, constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; warmup from ``warmup_steps`` or ``warmup_ratio * total_steps``."""
    warmup = int(cfg.get("warmup_steps", 0) or round(float(cfg.get("warmup_ratio", 0.0)) * total_steps))
    schedule = cfg.get("scheduler", "cosine")
    lr_lambda(0, warmup_steps=warmup, total_steps=total_steps, schedule=schedule, min_lr_ratio=0.0)  # validate name now

    def factor(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup, total_steps=total_steps, schedule=schedule,
                         min_lr_ratio=float(cfg.get("min_lr_ratio", 0.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
