"""A rich progress bar in a terminal, a plain tqdm bar in logs and CI.

Rich's live display redraws in place, which turns into thousands of lines when
stdout is a file; there the tqdm bar (one line per refresh) reads better.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme


class _CallbackMetrics:
    """Adds the ``progress_bar_metrics`` of callbacks that write to the loggers directly
    (throughput, learning rate) to what the bar shows beside ``self.log(..., prog_bar=True)``."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        for callback in trainer.callbacks:
            metrics.update(getattr(callback, "progress_bar_metrics", None) or {})
        return metrics


class Rich(_CallbackMetrics, RichProgressBar):
    """Lightning's rich bar, with callbacks' metrics."""


class TQDM(_CallbackMetrics, TQDMProgressBar):
    """Lightning's tqdm bar, with callbacks' metrics."""


def progress_bar(refresh_rate: int = 1, leave: bool = True) -> ProgressBar:
    """Rich when interactive, otherwise TQDM refreshed every 10 steps."""
    if sys.stdout.isatty():
        # ".3g": a learning rate of 3e-4 must not show as 0.000
        return Rich(refresh_rate=refresh_rate, leave=leave, theme=RichProgressBarTheme(metrics_format=".3g"))
    return TQDM(refresh_rate=max(refresh_rate, 10))
