"""DPO step time and peak memory: reference = adapter disabled vs a frozen copy.

Both runs train the same LoRA policy on the same pairs; only the reference differs.
Each runs in its own process so its peak resident memory (ru_maxrss) is its own.
A wider model than the demo's makes the copy's memory visible.

    python benchmarks/dpo_reference.py --steps 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

MODEL = ["model.config.hidden_size=256", "model.config.intermediate_size=704", "model.config.num_hidden_layers=4"]


def child(reference: str, steps: int, seed: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import framework_rate

    rate = framework_rate(["plugin=dpo", f"seed={seed}", f"trainer.max_steps={steps}", "adapter=lora",
                           f"objective.reference={reference}", *MODEL])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": 1 / rate, "peak_mb": peak_mb}))


def measure(reference: str, steps: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", reference, "--steps", str(steps), "--seed", str(seed)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.seed)
        return
    results = {"adapter": [], "copy": []}
    for i in range(args.repeats):
        for reference in results:
            results[reference].append(measure(reference, args.steps, i))
            r = results[reference][-1]
            print(f"repeat {i}: reference={reference:<7} {1000 * r['step_s']:7.1f} ms/step, peak {r['peak_mb']:7.0f} MB")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("step_s", "peak_mb")} for k, v in results.items()}
    for k, v in med.items():
        print(f"\nreference={k:<7}: {1000 * v['step_s']:7.1f} ms/step, peak resident memory {v['peak_mb']:7.0f} MB", end="")
    print(f"\n\nstep time adapter / copy: {med['adapter']['step_s'] / med['copy']['step_s']:.2f}; "
          f"peak memory adapter / copy: {med['adapter']['peak_mb'] / med['copy']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
