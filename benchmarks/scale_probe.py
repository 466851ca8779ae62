"""A Lightning callback that ``benchmarks/scale.py`` adds to a real ``train`` run, on every rank.

Passed as ``+callbacks.scale_probe._target_=scale_probe.ScaleProbe +callbacks.scale_probe.out=DIR``
(with ``benchmarks/`` on ``PYTHONPATH``). It counts what each rank holds, from the tensors
themselves: a sharded (DTensor) parameter, gradient or optimizer state counts its local shard
only, so DDP and FSDP2 are measured the same way. Each rank writes ``DIR/rank<N>.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

import lightning as L
import torch


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this rank stores for ``tensors``: a DTensor's local shard, a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def proc_status() -> dict[str, float]:
    """This process's peak and current resident set (``VmHWM``, ``VmRSS``), in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024
    return out


class ScaleProbe(L.Callback):
    """Per-rank parameter, gradient and optimizer-state bytes, peak RSS and step times."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.step_times: list[float] = []
        self.step_cpu: list[float] = []  # this process's CPU seconds (all threads) per step: robust to a busy machine
        self.grad_bytes = 0
        self._start = self._cpu = 0.0
        self.setup_status: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        # After loading and sharding, before the first step: the part of the peak that setup made.
        self.setup_status = proc_status()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        # Gradients are whole here (after backward and the gradient reduce, before zero_grad).
        self.grad_bytes = max(self.grad_bytes, local_bytes(p.grad for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.step_times.append(time.perf_counter() - self._start)
        self.step_cpu.append(time.process_time() - self._cpu)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        from torch.distributed.tensor import DTensor

        params = list(pl_module.parameters())
        state = [v for opt in trainer.optimizers for s in opt.state.values() for v in s.values()]
        rank = trainer.global_rank
        record = {
            "rank": rank, "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "pid": os.getpid(),
            "numel": sum(p.numel() for p in params),  # the full model's count (DTensor.numel is global)
            "param_bytes": local_bytes(params), "grad_bytes": self.grad_bytes, "optim_bytes": local_bytes(state),
            "sharded_params": sum(isinstance(p, DTensor) for p in params), "num_params": len(params),
            "step_times": self.step_times, "step_cpu": self.step_cpu, **proc_status(),
            "setup_VmHWM": self.setup_status.get("VmHWM"), "setup_VmRSS": self.setup_status.get("VmRSS"),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{rank}.json").write_text(json.dumps(record))
