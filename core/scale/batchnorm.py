"""BatchNorm across ranks: per-rank statistics unless synchronised, and synchronising needs GPUs.

Under DDP or FSDP each rank normalises with the mean and variance of its own ``data.batch_size``
items, so 2 ranks x batch 4 train differently from 1 process x batch 8 (the other losses of the
project are global across ranks). Lightning's ``trainer.sync_batchnorm=true`` swaps in torch's
``SyncBatchNorm``, whose forward runs only on CUDA/XPU tensors: on CPU processes it fails at the
first batch with torch's message, after the data and model were built. Both facts are said up
front here, with the choices a user has.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from modalforge.errors import ConfigError

_CHOICES = ("use GPUs with trainer.sync_batchnorm=true, a larger data.batch_size per rank, or a model "
            "without BatchNorm (GroupNorm / LayerNorm)")


def count_batchnorm(model: nn.Module) -> int:
    """The BatchNorm layers of ``model`` (1d, 2d, 3d and already synchronised ones)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _has_gpu(accelerator: str) -> bool:
    xpu = getattr(torch, "xpu", None)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return True
    return accelerator in ("auto", "xpu") and xpu is not None and xpu.is_available()


def check_sync_batchnorm(trainer_kwargs: dict[str, Any], accelerator: str = "auto") -> None:
    """``trainer.sync_batchnorm=true`` without GPUs is a config error, before anything is built."""
    if trainer_kwargs.get("sync_batchnorm") and not _has_gpu(accelerator):
        raise ConfigError("torch's SyncBatchNorm runs only on GPUs (CUDA/XPU), and this run has none",
                          where="trainer.sync_batchnorm=true",
                          hint=f"on CPU processes BatchNorm statistics stay per rank; {_CHOICES}")


def per_rank_note(model: nn.Module, world_size: int) -> str | None:
    """The line to print when a multi-process run normalises with per-rank statistics, else ``None``
    (one process, no BatchNorm, or every layer already ``SyncBatchNorm``)."""
    layers = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
                 for m in model.modules())
    if world_size <= 1 or not layers:
        return None
    return (f"[modalforge] {layers} BatchNorm layer(s) normalise with each rank's own batch statistics "
            f"({world_size} ranks): the run is not the same as one process with the global batch; {_CHOICES}")


class BatchNormPerRankNote(L.Callback):
    """Says it once, on rank zero, at the start of fit: the model exists only after ``configure_model``,
    and Lightning has swapped in ``SyncBatchNorm`` by then where ``trainer.sync_batchnorm=true``."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        note = per_rank_note(pl_module, trainer.world_size)
        if note and trainer.is_global_zero:
            print(note, flush=True)
