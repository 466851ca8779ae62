"""`module.compile`: steady-state step time and compile time of regional and whole-model compilation, against eager.

`train plugin=causal_lm` as a user runs it (the same callbacks and logger as benchmarks/overhead.py),
three ways in one process, alternating the order each repeat: eager (`module.compile=false`),
regional (`module.compile=true`: each decoder block compiled in place) and whole model
(`module.compile=model`). Printed per size: the mean steady-state step time (first `--warmup`
steps dropped), the speed-up over eager (median of the repeats), and the compile cost: the first
`--warmup` steps' time minus as many steady steps. Inductor's on-disk cache is emptied before each
run (`TORCHINDUCTOR_CACHE_DIR` in a fresh folder), so compile time is what a first run pays.

    python benchmarks/compile.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from overhead import SIZES, framework  # noqa: E402 - the same user run and step timer

MODES = ("false", "true", "model")
LABELS = {"false": "eager", "true": "regional", "model": "whole model"}


def one_run(size: str, mode: str, steps: int, seed: int, warmup: int) -> tuple[float, float]:
    """(steady ms/step, compile seconds) of one fresh run; wall clock."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        torch._dynamo.reset()  # no graph of an earlier run is reused in memory either
        with contextlib.redirect_stdout(io.StringIO()):
            times = framework([*SIZES[size], f"module.compile={mode}"], steps, seed)
    wall = [t for t, _ in times]
    steady = (wall[-1] - wall[warmup]) / (len(wall) - 1 - warmup)
    first = wall[warmup] - wall[0]
    return 1000 * steady, first - warmup * steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped (they hold the compilation)")
    parser.add_argument("--sizes", default="tiny,10m", help="comma-separated: tiny, 10m")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu (inductor)")
    rows = []
    for size in args.sizes.split(","):
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        for i in range(args.repeats):
            order = MODES if i % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                results[mode].append(one_run(size, mode, args.steps, i, args.warmup))
                ms, compile_s = results[mode][-1]
                print(f"{size} repeat {i} {LABELS[mode]:<11} {ms:8.2f} ms/step, compile {compile_s:6.1f} s",
                      flush=True)
        eager = [ms for ms, _ in results["false"]]
        for mode in MODES:
            ms = statistics.median(r[0] for r in results[mode])
            speedup = statistics.median(e / r[0] for e, r in zip(eager, results[mode]))
            compile_s = statistics.median(r[1] for r in results[mode])
            rows.append((size, LABELS[mode], ms, speedup, compile_s if mode != "false" else 0.0))
    print("\nsize  mode         ms/step  speed-up vs eager  compile s")
    for size, label, ms, speedup, compile_s in rows:
        print(f"{size:<5} {label:<11} {ms:8.2f} {speedup:18.3f} {compile_s:10.1f}")


if __name__ == "__main__":
    main()
