"""Logs tokens/s (or samples/s) of the training loop.

Lightning's ``ThroughputMonitor`` needs a ``batch_size_fn`` and FLOP counts per
model; the Objective already knows how many tokens a step carried
(``StepOutput.num_tokens``), so this callback only times steps and divides.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class ThroughputLogger(L.Callback):
    """Logs ``train/tokens_per_s`` (or ``train/samples_per_s``), averaged over ``window`` steps.

    Args:
        window: number of steps per measurement.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._start: float | None = None
        self._tokens = 0
        self._samples = 0
        self._steps = 0
        self.total_tokens = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        tokens = getattr(pl_module, "last_num_tokens", None)
        samples = getattr(pl_module, "last_batch_size", None)
        world = trainer.world_size
        self._tokens += (tokens or 0) * world
        self._samples += (samples or 0) * world
        self.total_tokens += (tokens or 0) * world
        self._steps += 1
        if self._steps < self.window or self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        metrics = {}
        if self._tokens:
            metrics["train/tokens_per_s"] = self._tokens / elapsed
        if self._samples:
            metrics["train/samples_per_s"] = self._samples / elapsed
        if metrics:
            pl_module.log_dict(metrics, prog_bar="train/tokens_per_s" in metrics, on_step=True, on_epoch=False)
        self._start, self._tokens, self._samples, self._steps = time.perf_counter(), 0, 0, 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._tokens, self._samples, self._steps = None, 0, 0, 0
