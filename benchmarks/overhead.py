"""Framework overhead: `train plugin=causal_lm` against a plain PyTorch loop, per step.

The same causal LM, packed data, AdamW (torch's default-for-modalforge fused kernel on both
sides), schedule, gradient clipping and number of steps, run by a hand-written loop and by
`train` as a user gets it (progress bar, CSV logger, learning-rate monitor, throughput
logger, checkpoint callback that checks every step; validation off, no checkpoint written
during the timed steps). The two are interleaved in one process, alternating which goes
first, at two model sizes: the tiny default and a ~10M-parameter Llama.

Printed per size: the mean steady-state step time of each (first ``--warmup`` steps
dropped), the framework's fixed cost per step (framework minus plain, in ms; median of the
paired repeats) and the ratio plain / framework (median of paired repeats).
Targets: fixed cost <= 0.5 ms per step; ratio >= 0.97 tiny, >= 0.99 at ~10M.

Both wall-clock and CPU time of the process are reported: on a machine shared with other
jobs, wall time includes waiting for a core and CPU time does not.

    python benchmarks/overhead.py --steps 200 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

import lightning as L
import torch
from hydra.utils import instantiate

import modalforge.run as run_mod
from modalforge.config import compose
from modalforge.models import build_model
from modalforge.optim import build_optimizer, build_scheduler

#: A ~10M-parameter Llama (with the demo's 512-token vocabulary).
MEDIUM = ["model.config.hidden_size=384", "model.config.intermediate_size=1024", "model.config.num_hidden_layers=6",
          "model.config.num_attention_heads=6", "model.config.num_key_value_heads=2"]
SIZES = {"tiny": [], "10m": MEDIUM}
#: What a user's run has, minus what is not a per-step cost: validation and checkpoint writes.
AS_A_USER = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.limit_val_batches=0",
             "trainer.val_check_interval=null", "trainer.enable_model_summary=false",
             "checkpoint.every_n_train_steps=1000000", "checkpoint.export_on_end=false", "module.num_samples=0"]


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process): on a shared machine CPU time leaves out the waits for a core."""
    return time.perf_counter(), time.process_time()


class StepTimes(L.Callback):
    """End time of every training step (the first is measured from the first batch's start)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        if not self.times:
            self.times.append(now())

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.times.append(now())


def steady_ms(times: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Mean (wall, CPU) step time in ms after ``warmup`` steps (first-step and warm-up costs excluded)."""
    steps = times[warmup:]
    return tuple(1000 * (steps[-1][i] - steps[0][i]) / (len(steps) - 1) for i in (0, 1))


def plain_loop(overrides: list[str], steps: int, seed: int) -> list[tuple[float, float]]:
    """Step end times of a hand-written loop over the same DataModule's batches."""
    cfg = compose(["plugin=causal_lm", *overrides])
    L.seed_everything(seed, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup()
    model = build_model(dict(cfg.model), dm.model_hints())
    optimizer = build_optimizer(model.named_parameters(), dict(cfg.optim))
    scheduler = build_scheduler(optimizer, dict(cfg.optim), steps)
    clip = cfg.trainer.gradient_clip_val
    model.train()
    times: list[tuple[float, float]] = []
    while len(times) <= steps:
        for batch in dm.train_dataloader():
            if not times:
                times.append(now())
            ids = batch["input_ids"]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            times.append(now())
            if len(times) > steps:
                break
    return times


def framework(overrides: list[str], steps: int, seed: int) -> list[tuple[float, float]]:
    """Step end times of `train plugin=causal_lm` with a user's callbacks and logger."""
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as tmp:
        run_mod.run(compose(["plugin=causal_lm", *overrides, *AS_A_USER, f"seed={seed}",
                             f"trainer.max_steps={steps}"]), tmp, callbacks=[timer])
    return timer.times


def measure(size: str, steps: int, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Interleaved repeats at one size; prints each pair and returns the medians (wall and CPU time)."""
    overrides = SIZES[size]
    params = sum(p.numel() for p in build_model(dict(compose(["plugin=causal_lm", *overrides]).model),
                                                {"vocab_size": 512}).parameters())
    print(f"\n== {size}: {params / 1e6:.2f}M parameters, {steps} steps per run, {repeats} paired repeats", flush=True)
    pairs: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for i in range(repeats):
        runs = {}
        for name, fn in ((("plain", plain_loop), ("framework", framework)) if i % 2 == 0
                         else (("framework", framework), ("plain", plain_loop))):  # alternate which goes first
            with contextlib.redirect_stdout(io.StringIO()):  # the progress bar still runs, unseen
                runs[name] = steady_ms(fn(overrides, steps, i), warmup)
        pairs.append((runs["plain"], runs["framework"]))
        (pw, pc), (fw, fc) = pairs[-1]
        print(f"repeat {i}: wall plain {pw:7.2f} / modalforge {fw:7.2f} ms/step (fixed {fw - pw:+6.2f} ms, "
              f"ratio {pw / fw:.3f});  CPU plain {pc:7.2f} / modalforge {fc:7.2f} ms/step (fixed {fc - pc:+6.2f} ms, "
              f"ratio {pc / fc:.3f})", flush=True)
    result = {}
    for clock, k in (("wall", 0), ("cpu", 1)):
        result[clock] = {"plain_ms": statistics.median(p[k] for p, _ in pairs),
                         "framework_ms": statistics.median(f[k] for _, f in pairs),
                         "fixed_ms": statistics.median(f[k] - p[k] for p, f in pairs),
                         "ratio": statistics.median(p[k] / f[k] for p, f in pairs)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10, help="steps dropped from the start of each run")
    parser.add_argument("--sizes", default="tiny,10m", help="comma-separated: tiny, 10m")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: CPU time then counts work, not OpenMP spinning; "
                             "0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; wall: what a dedicated machine shows; CPU: this process's "
          "CPU time, which leaves out the waits for a core on a shared machine")
    targets = {"tiny": 0.97, "10m": 0.99}
    results = {size: measure(size, args.steps, args.repeats, args.warmup) for size in args.sizes.split(",")}
    print("\nsize  clock  plain ms/step  modalforge ms/step  fixed cost ms/step (target <= 0.5)  ratio (target)")
    for size, by_clock in results.items():
        for clock, r in by_clock.items():
            print(f"{size:<5} {clock:<5} {r['plain_ms']:13.2f} {r['framework_ms']:19.2f} {r['fixed_ms']:+21.2f}"
                  f"{'':15}{r['ratio']:.3f} (>= {targets.get(size, 0.97)})")


if __name__ == "__main__":
    main()
