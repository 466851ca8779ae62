"""Start-up (data setup) time of an sft run, first start against second: the token cache at work.

A 50k-record chat set (system prompt, a question, an answer; messages format) is generated
locally, then the sft DataModule is set up twice, each time in a fresh process as two starts of
`train` would be: the first reads, trains the BPE, tokenises and packs, and writes the token
cache; the second reads and parses the records again (samples and evaluation use them) but maps
the tokenised rows from the cache. Data setup is timed from after the imports (torch,
transformers: the same for both starts) to the first collated batch. Target: second <= 10%
of the first.

    python benchmarks/tokenize_cache.py --records 50000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUP = """
import sys, time
begin = time.perf_counter()
from modalforge.plugins.text.sft.data import SFTDataModule
start = time.perf_counter()
dm = SFTDataModule(train=sys.argv[1], cache_dir=sys.argv[2], max_length=256, batch_size=16, num_workers=0)
dm.setup()
batch = dm.collate([dm.train_set[i] for i in range(16)])
entry, hit, count = dm.token_cache_entries["data.train"]
print(f"{time.perf_counter() - start:.3f} {int(hit)} {count} {len(dm.train_set)} {start - begin:.3f}")
"""


def write_set(path: Path, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
    with path.open("w") as f:
        for _ in range(records):
            a, b = rng.randint(0, 9999), rng.randint(0, 9999)
            name, op = rng.choice(ops)
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "You are a careful calculator. Answer in one sentence."},
                {"role": "user", "content": f"What is {a} {name} {b}? Please show the result."},
                {"role": "assistant", "content": f"{a} {name} {b} is {op(a, b)}."}]}) + "\n")


def start(train: Path, cache: Path) -> tuple[float, bool, int, int, float]:
    """One start in a fresh process: (data setup s, read from the cache?, examples, rows, import s)."""
    out = subprocess.run([sys.executable, "-c", SETUP, str(train), str(cache)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), bool(int(out[1])), int(out[2]), int(out[3]), float(out[4])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train, cache = Path(tmp) / "train.jsonl", Path(tmp) / "cache"
        write_set(train, args.records)
        t0 = time.perf_counter()
        first, hit1, examples, rows, imports = start(train, cache)
        second, hit2, _, _, _ = start(train, cache)
        assert not hit1 and hit2, "the second start did not read the token cache"
        size = sum(p.stat().st_size for p in (cache / "tokenized").rglob("*.npy"))
        print(f"{args.records} records -> {examples} train examples, {rows} packed rows; cache {size / 2**20:.1f} MiB")
        print(f"first start (tokenise, write the cache): {first:.2f} s")
        print(f"second start (read the cache):           {second:.2f} s")
        print(f"ratio second / first: {100 * second / first:.1f}% (target <= 10%); "
              f"imports before setup (not counted): {imports:.1f} s; wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
