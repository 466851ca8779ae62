"""Framework overhead: `train plugin=causal_lm` against a plain PyTorch loop.

Same tiny causal LM, same packed data, same AdamW + schedule, same number of
steps, measured alternately in one run (this machine is noisy, so only the
ratio means something). Prints steps/s of both and framework / plain. Target: >= 0.95.

    python benchmarks/overhead.py --steps 300 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from hydra.utils import instantiate

from _common import compare, framework_rate
from modalforge.config import compose
from modalforge.models import build_model
from modalforge.optim import build_optimizer, build_scheduler


def plain_loop(steps: int, seed: int) -> float:
    """steps/s of a hand-written loop over the same DataModule batches."""
    cfg = compose(["plugin=causal_lm"])
    L.seed_everything(seed, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup()
    model = build_model(dict(cfg.model), dm.model_hints())
    optimizer = build_optimizer(model.named_parameters(), dict(cfg.optim))
    scheduler = build_scheduler(optimizer, dict(cfg.optim), steps)
    model.train()
    done, start = 0, None
    while done < steps:
        for batch in dm.train_dataloader():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    compare("causal_lm", lambda i: plain_loop(args.steps, i),
            lambda i: framework_rate(["plugin=causal_lm", f"seed={i}", f"trainer.max_steps={args.steps}"]),
            args.repeats)


if __name__ == "__main__":
    main()
