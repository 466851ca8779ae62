"""VLM throughput with packing against padding, on the same data, in one run.

Prints real text tokens/s (neither padding nor image tokens) of `train plugin=vlm` with
`data.packing=true` and `false`, their ratio, and the share of padding in each case.
A comparison with TRL's VLM SFT path is not included (trl is not installed here).

    python benchmarks/vlm_packing.py --steps 40 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L

import modalforge.run as run_mod
from _common import NO_EXTRAS
from modalforge.config import compose


class RealTokenTimer(L.Callback):
    """Counts text tokens that are neither padding nor image tokens, and their time (first step excluded)."""

    def __init__(self) -> None:
        self.tokens, self.slots, self.start, self.end, self.seen = 0, 0, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.seen == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen += 1
        if self.seen > 1:
            dm = trainer.datamodule
            ids = batch["input_ids"]  # padding is the pad token, never text; image tokens are not text either
            real = (ids != dm.tokenizer.pad_token_id) & (ids != dm.processor.image_token_id)
            self.tokens += int(real.sum())
            self.slots += ids.numel()
            self.end = time.perf_counter()


def measure(packing: bool, steps: int, seed: int) -> tuple[float, float]:
    timer = RealTokenTimer()
    original = run_mod.build_callbacks
    run_mod.build_callbacks = lambda *a, **k: [*original(*a, **k), timer]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_mod.run(compose(["plugin=vlm", f"seed={seed}", f"trainer.max_steps={steps}",
                                 f"data.packing={str(packing).lower()}", *NO_EXTRAS]), tmp)
    finally:
        run_mod.build_callbacks = original
    return timer.tokens / (timer.end - timer.start), timer.tokens / max(timer.slots, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    packed, padded, ratios = [], [], []
    for i in range(args.repeats):
        p, p_text = measure(True, args.steps, i)
        u, u_text = measure(False, args.steps, i)
        packed.append(p)
        padded.append(u)
        ratios.append(p / u)
        print(f"repeat {i}: packed {p:,.0f} text tokens/s, padded {u:,.0f} text tokens/s")
    print(f"\ntext-token share of the batch: packed {100 * p_text:.1f}%, padded {100 * u_text:.1f}% "
          "(the rest: image tokens and padding)")
    print(f"packed : {statistics.median(packed):10,.0f} real text tokens/s (median of {args.repeats})")
    print(f"padded : {statistics.median(padded):10,.0f} real text tokens/s (median of {args.repeats})")
    print(f"ratio packed / padded: {statistics.median(ratios):.2f} (median of paired repeats)")


if __name__ == "__main__":
    main()
