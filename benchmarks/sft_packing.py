"""SFT throughput with packing against padding, on the same data, in one run; and packing's attention paths.

Default: real (non-padding) tokens/s of `train plugin=sft` with `data.packing=true` and `false`,
their ratio, and the share of padding tokens in each case.

`--paths`: at a long context (default 4096 tokens, a tiny Llama), how packed examples are kept
apart: `dense` (a block-diagonal L x L mask in the batch, sdpa), `position_ids` (no mask in the
batch; transformers derives the boundaries: its own mask for sdpa), and, where the device has
them, `flex` (FlexAttention's block mask; no backward on CPU) and `flash` (flash_attention_2's
varlen kernel). Each path runs in its own process (so its peak memory is its own), the paths
alternate over the repeats, and the loss of the first batch is checked equal across paths first.

    python benchmarks/sft_packing.py --steps 60 --repeats 3
    python benchmarks/sft_packing.py --paths --length 4096 --steps 8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
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
    with tempfile.TemporaryDirectory() as tmp:
        _, _, dm = run_mod.run(compose(["plugin=sft", f"seed={seed}", f"trainer.max_steps={steps}",
                                        f"data.packing={str(packing).lower()}", *NO_EXTRAS]), tmp, callbacks=[timer])
    share = dm.stats["padding_share_packed" if packing else "padding_share_unpacked"]
    return timer.tokens / (timer.end - timer.start), share


PATHS = {"dense": ("sdpa", "dense"), "position_ids": ("sdpa", "position_ids"),
         "flex": ("flex_attention", "position_ids"), "flash": ("flash_attention_2", "position_ids")}


def available_paths() -> list[str]:
    """Paths this machine can train with: flex needs a GPU for its backward, flash also its package."""
    import importlib.util

    import torch

    paths = ["dense", "position_ids"]
    if torch.cuda.is_available():
        paths.append("flex")
        if importlib.util.find_spec("flash_attn") is not None:
            paths.append("flash")
    return paths


def long_context_batches(length: int, steps: int, rows: int, seed: int = 0) -> list[dict]:
    """Packed batches of random-length examples (1/16 to 1/2 of the context) through the sft collator."""
    import torch

    from modalforge.text.packing import pack_first_fit
    from modalforge.text.tokenize import IGNORE, Tokenized

    g = torch.Generator().manual_seed(seed)
    examples = []
    while sum(len(e) for e in examples) < length * rows * (steps + 1):
        n = int(torch.randint(length // 16, length // 2, (1,), generator=g))
        ids = torch.randint(3, 500, (n,), generator=g).tolist()
        examples.append(Tokenized(ids, [IGNORE] * (n // 4) + ids[n // 4:]))
    packed = pack_first_fit(examples, length)
    return [packed[i * rows:(i + 1) * rows] for i in range(steps + 1)]


def run_path(path: str, length: int, steps: int, rows: int) -> dict:
    """One path in this process: first-batch loss, real tokens/s, mask bytes per row, peak memory."""
    import torch

    from modalforge.text.models import build_causal_lm
    from modalforge.text.packing import collate_rows, input_token_count

    implementation, attention = PATHS[path]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_causal_lm(config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "max_position_embeddings": length}, vocab_size=512,
                            attn_implementation=implementation).to(device)
    if implementation == "flash_attention_2":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [collate_rows(rows_, pad_id=0, packed=True, attention=attention)
               for rows_ in long_context_batches(length, steps, rows)]
    mask = batches[0].get("attention_mask")
    mask_bytes = 0 if mask is None else mask.element_size() * mask.numel() // mask.shape[0]

    def step(batch: dict) -> float:
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        loss = model(**inputs, labels=batch["labels"].to(device), use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first_loss = step(batches[0])  # also the warm-up (kernels, compilation)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, tokens = time.perf_counter(), 0
    for batch in batches[1:]:
        step(batch)
        tokens += int(input_token_count(batch))
    if device == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"path": path, "loss": first_loss, "tokens_per_s": tokens / took, "mask_bytes_per_row": mask_bytes,
            "peak_bytes": peak, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def compare_paths(length: int, steps: int, rows: int, repeats: int) -> None:
    paths = available_paths()
    results: dict[str, list[dict]] = {p: [] for p in paths}
    for i in range(repeats):
        for path in paths if i % 2 == 0 else paths[::-1]:  # alternate the order: the machine drifts
            out = subprocess.run([sys.executable, __file__, "--one-path", path, "--length", str(length),
                                  "--steps", str(steps), "--rows", str(rows)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{path} failed:\n{out.stderr[-2000:]}")
            results[path].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results["dense"][0]["loss"]
    for path in paths:
        if abs(results[path][0]["loss"] - base) > 1e-4 * max(1.0, abs(base)):
            raise SystemExit(f"{path} computes loss {results[path][0]['loss']:.6f} on the first batch, dense "
                             f"{base:.6f}: the examples are not kept apart the same way")
    device = results["dense"][0]["device"]
    print(f"context {length} tokens, {rows} packed row(s) per step, {steps} steps, device {device}; "
          f"first-batch loss equal on every path ({base:.5f})\n")
    print(f"{'path':<14}{'mask in batch/row':>18}{'peak memory':>14}{'real tokens/s':>15}{'vs dense':>10}")
    dense_rate = statistics.median(r["tokens_per_s"] for r in results["dense"])
    for path in paths:
        rate = statistics.median(r["tokens_per_s"] for r in results[path])
        peak = max(r["peak_bytes"] for r in results[path])
        mask = results[path][0]["mask_bytes_per_row"]
        print(f"{path:<14}{mask / 2**20:>15.1f} MB{peak / 2**20:>11.0f} MB{rate:>15,.0f}{rate / dense_rate:>9.2f}x")
    missing = [p for p in PATHS if p not in paths]
    if missing:
        print(f"\nnot on this machine: {', '.join(missing)} (flex needs a GPU for its backward; flash also flash-attn)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", action="store_true", help="compare packing's attention paths at a long context")
    parser.add_argument("--length", type=int, default=4096, help="context length for --paths")
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step for --paths")
    parser.add_argument("--one-path", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_path:
        print(json.dumps(run_path(args.one_path, args.length, args.steps, args.rows)))
        return
    if args.paths:
        compare_paths(args.length, args.steps, args.rows, args.repeats)
        return
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
