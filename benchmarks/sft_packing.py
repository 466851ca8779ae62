"""SFT throughput with packing against padding, on the same data, in one run.

Prints real (non-padding) tokens/s of `train plugin=sft` with `data.packing=true`
and `false`, their ratio, and the share of padding tokens in each case.

    python benchmarks/sft_packing.py --steps 60 --repeats 3
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
    """Counts non-padding input tokens and the time they took (first step excluded)."""

    def __init__(self) -> None:
        self.tokens, self.start, self.end, self.pad, self.seen = 0, None, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.pad is None:
            self.pad = trainer.datamodule.processor.pad_token_id
        if self.seen == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.seen += 1
        if self.seen > 1:
            self.tokens += int((batch["input_ids"] != self.pad).sum())
            self.end = time.perf_counter()


def measure(packing: bool, steps: int, seed: int) -> tuple[float, float]:
    timer = RealTokenTimer()
    original = run_mod.build_callbacks
    run_mod.build_callbacks = lambda *a, **k: [*original(*a, **k), timer]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _, _, dm = run_mod.run(compose(["plugin=sft", f"seed={seed}", f"trainer.max_steps={steps}",
                                            f"data.packing={str(packing).lower()}", *NO_EXTRAS]), tmp)
    finally:
        run_mod.build_callbacks = original
    share = dm.stats["padding_share_packed" if packing else "padding_share_unpacked"]
    return timer.tokens / (timer.end - timer.start), share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    packed, padded, ratios = [], [], []
    for i in range(args.repeats):
        p, p_share = measure(True, args.steps, i)
        u, u_share = measure(False, args.steps, i)
        packed.append(p)
        padded.append(u)
        ratios.append(p / u)
        print(f"repeat {i}: packed {p:,.0f} real tokens/s, padded {u:,.0f} real tokens/s")
    print(f"\npadding share of tokens: packed {100 * p_share:.1f}%, padded {100 * u_share:.1f}%")
    print(f"packed : {statistics.median(packed):10,.0f} real tokens/s (median of {args.repeats})")
    print(f"padded : {statistics.median(padded):10,.0f} real tokens/s (median of {args.repeats})")
    print(f"ratio packed / padded: {statistics.median(ratios):.2f} (median of paired repeats)")


if __name__ == "__main__":
    main()
