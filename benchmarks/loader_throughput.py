"""Is the data loader the bottleneck? Loading alone against the training step, per plugin.

For each plugin, on its offline default: the training run's steps/s (`train plugin=...`, as the
user runs it), then the same DataModule's train loader iterated alone (no model), in batches/s.
With ``num_workers=0`` loading and computing take turns, so the share of a step spent loading
is (steps/s) / (loader batches/s); above about 10%, `data.num_workers` (or `auto` on a machine
with more cores) pays. With workers, the loader's batches/s must stay well above the steps/s.

    python benchmarks/loader_throughput.py                       # every built-in plugin
    python benchmarks/loader_throughput.py --plugins clip sft --workers 0 1
    python benchmarks/loader_throughput.py --plugins whisper_asr --workers 0 --set data.cache_features=false
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
from typing import Any

import modalforge.run as run_mod
from _common import NO_EXTRAS, StepTimer
from modalforge.config import compose
from modalforge.data.workers import usable_cores

PLUGINS = ["causal_lm", "sft", "dpo", "reward_model", "grpo", "ppo", "image_classification", "clip",
           "diffusion", "whisper_asr", "wav2vec2", "vlm", "multitask"]


def train_rate(plugin: str, steps: int, workers: str, extra: list[str] = ()) -> tuple[float, Any]:
    """Steps/s of a short run, and its DataModule (set up, for the loader-alone pass)."""
    timer = StepTimer()
    overrides = [f"plugin={plugin}", f"trainer.max_steps={steps}", *NO_EXTRAS, *extra]
    if plugin != "multitask":
        overrides.append(f"data.num_workers={workers}")
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        _, _, datamodule = run_mod.run(compose(overrides), tmp, callbacks=[timer])
    return timer.rate(), datamodule


def loader_rate(datamodule: Any, batches: int) -> tuple[float, int]:
    """Batches/s of the train loader alone (the first batch, which starts workers, excluded)."""
    loader = datamodule.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            break
        seen += 1
    return seen / (time.perf_counter() - start), int(getattr(loader, "num_workers", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", nargs="+", default=PLUGINS)
    parser.add_argument("--steps", type=int, default=15, help="training steps timed per plugin")
    parser.add_argument("--batches", type=int, default=30, help="loader batches timed per plugin")
    parser.add_argument("--workers", nargs="+", default=["auto"], help="data.num_workers values to try")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, e.g. data.cache_features=false")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)  # the runs' own banners would bury the table
    print(f"{usable_cores()} usable cores\n")
    print(f"{'plugin':<22}{'workers':>8}{'train steps/s':>15}{'loader batches/s':>18}{'loading share':>15}")
    for plugin in args.plugins:
        for workers in args.workers:
            steps_per_s, datamodule = train_rate(plugin, args.steps, workers, args.set)
            batches_per_s, used = loader_rate(datamodule, args.batches)
            share = steps_per_s / batches_per_s
            print(f"{plugin:<22}{used:>8}{steps_per_s:>15.2f}{batches_per_s:>18.1f}{100 * share:>14.1f}%", flush=True)
    print("\nloading share = train steps/s / loader batches/s: the part of a step spent waiting for data when "
          "loading is not overlapped (num_workers=0); above ~10%, raise data.num_workers.")


if __name__ == "__main__":
    main()
