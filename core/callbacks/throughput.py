"""Logs tokens/s (or samples/s) and learning rates, with one definition for every plugin.

Lightning's ``ThroughputMonitor`` needs a ``batch_size_fn`` and FLOP counts per
model; the Objective already knows how many tokens a step carried
(``StepOutput.num_tokens``), so this callback only times steps and divides.

- ``train/tokens_per_s``: input tokens per second, padding excluded (``StepOutput.num_tokens``);
  in every plugin the tokens the model read, so ``sft``, ``dpo`` and ``causal_lm`` runs compare,
  and so do runs of other frameworks that count input tokens (TRL, torchtitan).
- ``train/learned_tokens_per_s``: tokens the loss is computed on per second
  (``StepOutput.num_learned_tokens``: assistant tokens in ``sft``, completions in ``dpo``).
- ``train/samples_per_s``: examples per second (``StepOutput.batch_size``).
- ``train/lr``: the learning rate of the first parameter group, and ``train/lr/group<i>`` for
  every group when ``optim.param_groups`` gives them different rates.

Each is measured over the steps between two logging steps (``trainer.log_every_n_steps``),
data loading included, and written straight to the loggers, as Lightning's
``LearningRateMonitor`` does: ``LightningModule.log`` costs a fraction of a millisecond per
key, which a small model's step notices (``benchmarks/overhead.py``). The progress bar shows
``progress_bar_metrics`` (see :mod:`modalforge.callbacks.progress`).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def _count(value: int | torch.Tensor | None) -> int | torch.Tensor:
    # A tensor count stays on its device until the window closes: one sync per window, not per step.
    return 0 if value is None else value


class ThroughputLogger(L.Callback):
    """Logs throughput (``train/tokens_per_s``, ``train/learned_tokens_per_s``, ``train/samples_per_s``) and ``train/lr``.

    Args:
        window: steps per measurement; ``None``: ``trainer.log_every_n_steps`` (one write per logging step).
    """

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        #: The latest figures, for the progress bar.
        self.progress_bar_metrics: dict[str, float] = {}
        self._start: float | None = None
        self._tokens: int | torch.Tensor = 0
        self._learned: int | torch.Tensor = 0
        self._samples = 0
        self._steps = 0
        self._lrs: list[float] = []
        self.total_tokens: int | torch.Tensor = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()
        if trainer.optimizers:  # the rates this step trains with, before the scheduler steps
            self._lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        world = trainer.world_size
        tokens = _count(getattr(pl_module, "last_num_tokens", None)) * world
        self._tokens = self._tokens + tokens
        self.total_tokens = self.total_tokens + tokens
        self._learned = self._learned + _count(getattr(pl_module, "last_num_learned_tokens", None)) * world
        self._samples += (getattr(pl_module, "last_batch_size", None) or 0) * world
        self._steps += 1
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's own rows carry
        every = self.window or trainer.log_every_n_steps
        if not every or (self.window and self._steps < every) or (not self.window and (step + 1) % every):
            return
        if self._start is not None and self._steps > 1:
            self._write(trainer, self._measure(), step)
        self._reset()
        self._start = time.perf_counter()

    def _measure(self) -> dict[str, float]:
        totals = {"tokens": float(self._tokens), "learned_tokens": float(self._learned), "samples": self._samples}
        elapsed = time.perf_counter() - self._start  # after float(): queued device work has finished
        metrics = {f"train/{key}_per_s": total / elapsed for key, total in totals.items() if total}
        return metrics

    def _write(self, trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        lrs = [float(lr) for lr in self._lrs]
        if lrs:
            metrics["train/lr"] = lrs[0]
            if len(set(lrs)) > 1:
                metrics.update({f"train/lr/group{i}": lr for i, lr in enumerate(lrs)})
        self.progress_bar_metrics = {k: v for k, v in metrics.items() if k in ("train/lr", "train/tokens_per_s")}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _reset(self) -> None:
        self._start, self._tokens, self._learned, self._samples, self._steps = None, 0, 0, 0, 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
