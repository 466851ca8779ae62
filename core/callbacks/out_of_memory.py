"""Out of memory during a step: one line with the step, the batch's shape and the switches that fit.

A CUDA out-of-memory (``torch.OutOfMemoryError``), the CPU allocator's ``RuntimeError``
(``DefaultCPUAllocator: can't allocate memory``) or Python's ``MemoryError`` ends a run
in a traceback that names neither the batch nor what to change. ``OutOfMemoryReport``
remembers the batch in hand and, when the error comes, drops the step's gradients and the
finished frames' activations so that ``CheckpointOnInterrupt`` (after it in the callback
list) can save the current state; :func:`explain_out_of_memory` then turns the error into
an :class:`OutOfMemory` line: the step, the batch (items and tokens), whether the state
was saved, and up to three of ``data.batch_size`` with ``trainer.accumulate_grad_batches``
(the same optimizer step; or ``data.batch_size=auto``: the largest batch that fits),
``module.gradient_checkpointing=true``, ``strategy=fsdp``,
``adapter=lora``/``qlora`` and ``optim.name=adamw_8bit``, those that are not already set.
"""

from __future__ import annotations

import gc
import re
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch

from modalforge.errors import ModalforgeError

_CPU_MARKERS = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")
_MARKERS = ("CUDA out of memory", "out of memory", *_CPU_MARKERS)


class OutOfMemory(ModalforgeError):
    """The device or host ran out of memory in a step; ``where`` is the step and batch."""


def out_of_memory_cause(err: BaseException) -> BaseException | None:
    """The out-of-memory error in ``err``'s chain (CUDA, MPS, CPU allocator or ``MemoryError``), if any."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (MemoryError, oom_type)):
            return current
        if isinstance(current, RuntimeError) and any(m in str(current) for m in _MARKERS):
            return current
        current = current.__cause__ or current.__context__
    return None


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} TiB"  # pragma: no cover


def _what(err: BaseException) -> str:
    """Which memory ran out, and the allocation that failed, from the allocator's message."""
    text = str(err)
    asked = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B)", text)
    asked_bytes = re.search(r"allocate (\d+) bytes", text)
    how = f", allocating {asked.group(1)}" if asked else (
        f", allocating {_size(int(asked_bytes.group(1)))}" if asked_bytes else "")
    if "CUDA" in text or type(err).__name__ == "OutOfMemoryError" and "CPU" not in text:
        return f"the GPU ran out of memory{how}"
    if "MPS" in text:
        return f"the MPS device ran out of memory{how}"
    return f"the host (CPU) ran out of memory{how}"


def _tensors(batch: Any, name: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [(name or "batch", batch)]
    if isinstance(batch, Mapping):
        return [t for key, value in batch.items() for t in _tensors(value, f"{name}.{key}" if name else str(key))]
    if isinstance(batch, (list, tuple)):
        return [t for i, value in enumerate(batch) for t in _tensors(value, f"{name}[{i}]" if name else f"[{i}]")]
    return []


def describe_batch(batch: Any) -> str | None:
    """``8 items × 512 tokens (input_ids 8×512)`` or ``64 items (images 64×3×32×32)``; ``None`` without tensors."""
    tensors = [(n, t) for n, t in _tensors(batch) if t.ndim > 0]
    if not tensors:
        return None
    items = tensors[0][1].shape[0]
    ids = [(n, t) for n, t in tensors if t.ndim == 2 and not t.is_floating_point() and t.dtype != torch.bool]
    name, largest = max(ids or tensors, key=lambda nt: nt[1].numel())
    shape = "×".join(str(d) for d in largest.shape)
    if ids:
        return f"{items} items × {largest.shape[1]} tokens = {largest.numel():,} tokens ({name} {shape})"
    return f"{items} items ({name} {shape})"


def switches(cfg: Mapping[str, Any], trainer: L.Trainer | None, *, limit: int = 3) -> list[str]:
    """The memory switches that fit this run (not already set), most specific first."""
    data, module = cfg.get("data") or {}, cfg.get("module") or {}
    adapter = str((cfg.get("adapter") or {}).get("_target_", ""))
    optim = str((cfg.get("optim") or {}).get("name", ""))
    strategy = str((cfg.get("strategy") or {}).get("name", "auto"))
    found = []
    batch_size = data.get("batch_size")
    if batch_size == "auto":  # found at fit start, then a larger batch came (longer texts): half of what was found
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    accumulate = int(getattr(trainer, "accumulate_grad_batches", None) or
                     (cfg.get("trainer") or {}).get("accumulate_grad_batches") or 1)
    if isinstance(batch_size, int) and batch_size > 1:
        found.append(f"data.batch_size={batch_size // 2} trainer.accumulate_grad_batches={accumulate * 2} "
                     "(the same step in two halves" + (")" if data.get("batch_size") == "auto" else
                                                       "; data.batch_size=auto: the largest batch that fits)"))
    if "gradient_checkpointing" in module and not module.get("gradient_checkpointing"):
        found.append("module.gradient_checkpointing=true")
    devices = int(getattr(trainer, "num_devices", 1) or 1) * int(getattr(trainer, "num_nodes", 1) or 1)
    if devices > 1 and strategy not in ("fsdp", "fsdp1", "deepspeed_zero3"):
        found.append("strategy=fsdp (shards weights, gradients and optimizer state over the devices)")
    if adapter.endswith(".FullAdapter"):
        found.append("adapter=lora")
    elif adapter.endswith((".LoraAdapter", ".DoraAdapter")):
        found.append("adapter=qlora")
    if optim == "adamw":
        found.append("optim.name=adamw_8bit")
    return found[:limit]


class OutOfMemoryReport(L.Callback):
    """Remember the batch in hand; on out-of-memory, free what the failed step held so a checkpoint fits."""

    def __init__(self) -> None:
        self.batch: Any = None
        self.batch_idx: int | None = None
        self.stage = "training"
        self.started = time.time()
        self.step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.time()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batch, self.batch_idx, self.stage = batch, batch_idx, "training"

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self.batch, self.batch_idx, self.stage = batch, batch_idx, "validation"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batch = None  # not kept alive while the next batch is fetched

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.batch = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if out_of_memory_cause(exception) is None:
            return
        self.step = trainer.global_step
        # The activations of the failed forward/backward live on in the traceback's finished frames.
        traceback.clear_frames(exception.__traceback__)
        for p in pl_module.parameters():
            p.grad = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _saved(trainer: L.Trainer, since: float) -> str | None:
    from modalforge.callbacks.interrupt import CheckpointOnInterrupt

    for callback in trainer.callbacks:
        if isinstance(callback, CheckpointOnInterrupt):
            path = Path(callback.path)
            if path.is_file() and path.stat().st_mtime >= since:
                return str(path)
    return None


def explain_out_of_memory(err: BaseException, trainer: L.Trainer | None,
                          cfg: Mapping[str, Any]) -> OutOfMemory | None:
    """The one-line error for an out-of-memory in ``err``'s chain, or ``None`` for any other error."""
    cause = out_of_memory_cause(err)
    if cause is None:
        return None
    report = next((c for c in getattr(trainer, "callbacks", None) or [] if isinstance(c, OutOfMemoryReport)), None)
    step = trainer.global_step if trainer is not None else 0
    if report is not None and report.batch_idx is not None:
        where = (f"step {step + 1} (batch {report.batch_idx} of epoch {trainer.current_epoch})" if report.stage ==
                 "training" else f"validation at step {step} (batch {report.batch_idx})")
        shape = describe_batch(report.batch)
        what = _what(cause) + (f" on a batch of {shape}" if shape else "")
    else:
        where, what = "before the first batch", _what(cause) + " building the model or the data"
    saved = _saved(trainer, report.started) if trainer is not None and report is not None else None
    if saved:
        what += f"; the state at step {step} is saved in {saved} (ckpt_path=last continues from it)"
    elif step:
        what += "; the state could not be saved"
    fits = switches(cfg, trainer)
    hint = ("use less memory per step: " + ", or ".join(fits)) if fits else \
        "use a smaller batch (data.batch_size=auto finds the largest that fits) or model"
    return OutOfMemory(what, where=where, hint=hint)
