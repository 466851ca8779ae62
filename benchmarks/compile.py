"""`module.compile`: steady-state step time and compile time of regional and whole-model compilation, against eager.

`train plugin=causal_lm` as a user runs it (the same callbacks and logger as benchmarks/overhead.py),
three ways in one process, alternating the order each repeat: eager (`module.compile=false`),
regional (`module.compile=true`: each decoder block compiled in place) and whole model
(`module.compile=model`). Printed per size: the mean steady-state step time (first `--warmup`
steps dropped), the speed-up over eager (median of the repeats), and the compile cost: the first
`--warmup` steps' time minus as many steady steps. Each run is its own process: `cold` with an
empty inductor cache (`TORCHINDUCTOR_CACHE_DIR` a fresh folder: what a first run pays), `warm` with
the cache an untimed run of the same size and mode filled (what the next runs pay).

    python benchmarks/compile.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("false", "true", "model")
LABELS = {"false": "eager", "true": "regional", "model": "whole model"}


def child(size: str, mode: str, steps: int, seed: int, warmup: int, threads: int) -> None:
    """One run in this process; prints {"ms": steady ms/step, "compile_s": first steps' extra seconds}."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from overhead import SIZES, framework  # the same user run and step timer

    if threads:
        torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        times = framework([*SIZES[size], f"module.compile={mode}"], steps, seed)
    wall = [t for t, _ in times]
    steady = (wall[-1] - wall[warmup]) / (len(wall) - 1 - warmup)
    print(json.dumps({"ms": 1000 * steady, "compile_s": wall[warmup] - wall[0] - warmup * steady}))


def one_run(size: str, mode: str, steps: int, seed: int, warmup: int, threads: int, cache: str) -> tuple[float, float]:
    """(steady ms/step, compile seconds) of a run in its own process with inductor's cache in ``cache``."""
    proc = subprocess.run([sys.executable, __file__, "--child", size, mode, str(steps), str(seed), str(warmup),
                           str(threads)], capture_output=True, text=True,
                          env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if proc.returncode:
        raise SystemExit(f"{size} {mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["ms"], max(result["compile_s"], 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped (they hold the compilation)")
    parser.add_argument("--sizes", default="tiny,10m", help="comma-separated: tiny, 10m")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0: torch's default)")
    parser.add_argument("--child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, mode, steps, seed, warmup, threads = args.child
        child(size, mode, int(steps), int(seed), int(warmup), int(threads))
        return
    import torch

    print(f"torch {torch.__version__}, threads per run {args.threads or torch.get_num_threads()}, cpu (inductor)")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes.split(","):
            warm = {m: str(Path(root) / f"warm-{size}-{m}") for m in MODES}
            for mode in MODES[1:]:  # fill each warm cache once, untimed
                one_run(size, mode, args.warmup + 2, 0, args.warmup, args.threads, warm[mode])
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for i in range(args.repeats):
                order = MODES if i % 2 == 0 else tuple(reversed(MODES))
                for mode in order:
                    for cache in (("cold", "warm") if mode != "false" else ("cold",)):
                        folder = warm[mode] if cache == "warm" else tempfile.mkdtemp(dir=root)
                        r = one_run(size, mode, args.steps, i, args.warmup, args.threads, folder)
                        results.setdefault((mode, cache), []).append(r)
                        print(f"{size} repeat {i} {LABELS[mode]:<11} {cache}: {r[0]:8.2f} ms/step, "
                              f"compile {r[1]:6.1f} s", flush=True)
            eager = [ms for ms, _ in results[("false", "cold")]]
            for (mode, cache), runs in results.items():
                speedup = statistics.median(e / r[0] for e, r in zip(eager, runs))
                rows.append((size, f"{LABELS[mode]}{'' if mode == 'false' else ' ' + cache}",
                             statistics.median(r[0] for r in runs), speedup,
                             statistics.median(r[1] for r in runs) if mode != "false" else 0.0))
    print("\nsize  mode                 ms/step  speed-up vs eager  compile s")
    for size, label, ms, speedup, compile_s in rows:
        print(f"{size:<5} {label:<19} {ms:8.2f} {speedup:18.3f} {compile_s:10.1f}")


if __name__ == "__main__":
    main()
