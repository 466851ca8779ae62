"""CLIP samples/s: `train plugin=clip` against open_clip's own training step.

The plain loop is what open_clip's `train_one_epoch` does per batch: encode both
towers, `ClipLoss` with the model's logit scale, backward, AdamW step, clamp the
logit scale to ln(100). Same model, batch, data and optimizer, alternating in one
run. Target: the framework within 5% (ratio >= 0.95).

    python benchmarks/clip_throughput.py --steps 100 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import time

import lightning as L
import torch
from hydra.utils import instantiate
from open_clip.loss import ClipLoss

from _common import compare, framework_rate
from modalforge.config import compose
from modalforge.models import build_model
from modalforge.optim import build_optimizer


def open_clip_loop(steps: int, seed: int, batch_size: int) -> float:
    cfg = compose(["plugin=clip", f"data.batch_size={batch_size}"])
    L.seed_everything(seed, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup()
    model = build_model(dict(cfg.model), dm.model_hints())
    optimizer = build_optimizer(model.named_parameters(), dict(cfg.optim))
    loss_fn = ClipLoss()
    model.train()
    done, start = 0, None
    while done < steps:
        for batch in dm.train_dataloader():
            if start is None:
                start = time.perf_counter()
            image = model.encode_image(batch["images"], normalize=True)
            text = model.encode_text(batch["texts"], normalize=True)
            loss = loss_fn(image, text, model.logit_scale.exp())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            done += 1
            if done == steps:
                break
    return (steps - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    compare("clip", lambda i: open_clip_loop(args.steps, i, args.batch_size),
            lambda i: framework_rate(["plugin=clip", f"seed={i}", f"trainer.max_steps={args.steps}",
                                      f"data.batch_size={args.batch_size}", "optim.warmup_steps=0",
                                      "optim.scheduler=constant"]),
            args.repeats, unit="samples/s", scale=args.batch_size)


if __name__ == "__main__":
    main()
