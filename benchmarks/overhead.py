"""Framework overhead: `train plugin=causal_lm` against a plain PyTorch loop.

Same tiny causal LM, same packed data, same AdamW + schedule, same number of
steps, measured in one run (this machine is noisy, so only the ratio means
something). Prints steps/s of both and framework / plain. Target: >= 0.95.

    python benchmarks/overhead.py --steps 300 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import lightning as L
import torch

from modalforge.config import compose
from modalforge.models import build_model
from modalforge.optim import build_optimizer, build_scheduler
from modalforge.run import run


def plain_loop(steps: int, seed: int) -> float:
    """steps/s of a hand-written loop over the same DataModule batches."""
    cfg = compose(["plugin=causal_lm"])
    from hydra.utils import instantiate

    L.seed_everything(seed, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup()
    model = build_model(dict(cfg.model), dm.model_hints())
    optim_cfg = dict(cfg.optim)
    optimizer = build_optimizer(model.named_parameters(), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, steps)
    model.train()
    loader = dm.train_dataloader()
    done, start = 0, None
    while done < steps:
        for batch in loader:
            if start is None:
                start = time.perf_counter()
            ids = batch["input_ids"]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            if done == steps:
                break
    return (steps - 1) / (time.perf_counter() - start)


class _Timer(L.Callback):
    def __init__(self) -> None:
        self.start = self.end = None
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:  # noqa: ANN002
        self.steps += 1
        self.end = time.perf_counter()


def framework(steps: int, seed: int) -> float:
    """steps/s of the same training through modalforge (progress bar, logging, throughput callbacks on)."""
    timer = _Timer()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(["plugin=causal_lm", f"seed={seed}", f"trainer.max_steps={steps}", "trainer.accelerator=cpu",
                       "trainer.devices=1", "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
                       "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=1000000",
                       "checkpoint.export_on_end=false", "module.num_samples=0"])
        import modalforge.run as run_mod

        original = run_mod.build_callbacks
        run_mod.build_callbacks = lambda *a, **k: [*original(*a, **k), timer]
        try:
            run(cfg, tmp)
        finally:
            run_mod.build_callbacks = original
    return (timer.steps - 1) / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("MODALFORGE_QUIET", "1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    plain, fw = [], []
    for i in range(args.repeats):  # interleaved so drift in machine load hits both alike
        plain.append(plain_loop(args.steps, seed=i))
        fw.append(framework(args.steps, seed=i))
        print(f"repeat {i}: plain {plain[-1]:.2f} steps/s, modalforge {fw[-1]:.2f} steps/s")
    p, f = statistics.median(plain), statistics.median(fw)
    paired = statistics.median(b / a for a, b in zip(plain, fw))
    print(f"\nplain PyTorch loop    : {p:8.2f} steps/s (median of {args.repeats})")
    print(f"train plugin=causal_lm: {f:8.2f} steps/s (median of {args.repeats})")
    print(f"ratio modalforge / plain: {paired:.3f} (median of paired repeats; target >= 0.95)")


if __name__ == "__main__":
    main()
