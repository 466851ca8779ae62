"""A rich progress bar in a terminal, a plain tqdm bar in logs and CI.

Rich's live display redraws in place, which turns into thousands of lines when
stdout is a file; there the tqdm bar (one line per refresh) reads better.
"""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme


def progress_bar(refresh_rate: int = 1, leave: bool = True) -> ProgressBar:
    """Rich when interactive, otherwise TQDM refreshed every 10 steps."""
    if sys.stdout.isatty():
        # ".3g": a learning rate of 3e-4 must not show as 0.000
        return RichProgressBar(refresh_rate=refresh_rate, leave=leave, theme=RichProgressBarTheme(metrics_format=".3g"))
    return TQDMProgressBar(refresh_rate=max(refresh_rate, 10))
