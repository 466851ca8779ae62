"""Shared pieces of the benchmarks: timing the framework's steps, and paired ratios.

Benchmarks run a plain PyTorch loop and `train plugin=...` alternately in one process
(the machines are noisy), and report the median of the per-repeat ratios.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable, Sequence

import lightning as L

import modalforge.run as run_mod
from modalforge.config import compose

NO_EXTRAS = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.limit_val_batches=0",
             "trainer.val_check_interval=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             "checkpoint.every_n_train_steps=1000000", "checkpoint.export_on_end=false", "module.num_samples=0"]


class StepTimer(L.Callback):
    """Wall time from the first training batch to the last (setup and teardown excluded)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.steps += 1
        self.end = time.perf_counter()

    def rate(self) -> float:
        """Steps per second after the first step (which pays one-off costs in both loops)."""
        return (self.steps - 1) / (self.end - self.start)


def framework_rate(overrides: Sequence[str]) -> float:
    """Steps/s of `train` with these overrides, progress bar, logging and throughput callbacks on."""
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        run_mod.run(compose([*overrides, *NO_EXTRAS]), tmp, callbacks=[timer])
    return timer.rate()


def compare(name: str, plain: Callable[[int], float], framework: Callable[[int], float], repeats: int,
            unit: str = "steps/s", scale: float = 1.0, target: float = 0.95) -> None:
    """Alternate the two loops ``repeats`` times; print each figure and the median paired ratio."""
    plain_rates, framework_rates = [], []
    for i in range(repeats):
        plain_rates.append(plain(i) * scale)
        framework_rates.append(framework(i) * scale)
        print(f"repeat {i}: plain {plain_rates[-1]:.2f} {unit}, modalforge {framework_rates[-1]:.2f} {unit}")
    ratio = statistics.median(b / a for a, b in zip(plain_rates, framework_rates))
    print(f"\nplain loop            : {statistics.median(plain_rates):8.2f} {unit} (median of {repeats})")
    print(f"train plugin={name:<9}: {statistics.median(framework_rates):8.2f} {unit} (median of {repeats})")
    print(f"ratio modalforge / plain: {ratio:.3f} (median of paired repeats; target >= {target})")
