"""Per-rank memory and tokens/s of a ~50M / ~100M-parameter Llama: 1 process, DDP x 2, FSDP2 x 2.

A Llama is built from a ``LlamaConfig`` (vocabulary: the causal_lm demo tokenizer's), saved with
that tokenizer to a temp dir, and trained a few steps by the real ``train`` CLI
(``plugin=causal_lm model=causal_lm/pretrained model.name_or_path=<dir>``) three ways:
``trainer.devices=1``, ``strategy=ddp trainer.devices=2``, ``strategy=fsdp trainer.devices=2``
(FSDP2: ``fully_shard`` on each decoder layer, then the model; Lightning starts the second
process, gloo on CPU). A callback inside the run (``benchmarks/scale_probe.py``) writes, per
rank, the bytes of parameters, gradients and AdamW state counted from the tensors' local
shards, the peak resident set (``VmHWM``) and the step times.

Printed: a table per case and rank, and the ratio FSDP2 / DDP of the per-rank
parameter + gradient + optimizer bytes (target <= 0.55). With ``--repeats N`` the cases
alternate and tokens/s is the median over repeats.

On CPU, glibc keeps the freed per-block buffers of FSDP2's gathers in its heap, which hides the
saving in the peak RSS; ``MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/scale.py`` shows it.

    python benchmarks/scale.py                    # ~50M parameters, 6 steps of 4 x 128 tokens per rank
    python benchmarks/scale.py --size 100m --steps 4 --cases ddp fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: hidden, layers, intermediate (heads: hidden / 64); with the ~520-token demo vocabulary.
SIZES = {"50m": (640, 10, 1792), "100m": (768, 14, 2048)}
CASES = {
    "single": ["trainer.devices=1"],
    "ddp": ["strategy=ddp", "trainer.devices=2"],
    "fsdp": ["strategy=fsdp", "trainer.devices=2"],
}
SHORT = ["trainer.accelerator=cpu", "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.enable_checkpointing=false",
         "checkpoint.export_on_end=false", "module.num_samples=0", "callbacks=none"]


def save_model(folder: Path, size: str) -> int:
    """The Llama of ``size`` with the causal_lm demo tokenizer, saved as a downloaded model would be."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modalforge.plugins.text.causal_lm.data import CausalLMDataModule

    dm = CausalLMDataModule(block_size=32, batch_size=1)
    dm.setup()
    hidden, layers, intermediate = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(dm.processor), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    dm.processor.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_case(case: str, folder: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """One ``train`` run; the probe's per-rank records, rank order."""
    out = work / "probe"
    overrides = ["plugin=causal_lm", "model=causal_lm/pretrained", f"model.name_or_path={folder}", *SHORT,
                 *CASES[case], f"trainer.max_steps={args.steps}", f"data.block_size={args.block}",
                 f"data.batch_size={args.batch}", "data.num_workers=0", f"run_dir={work / 'run'}",
                 "+callbacks.scale_probe._target_=scale_probe.ScaleProbe", f"+callbacks.scale_probe.out={out}"]
    processes = 2 if "trainer.devices=2" in CASES[case] else 1
    # Each process gets its share of the cores. Lightning sets it for DDP's ranks, but under
    # ModelParallelStrategy (FSDP2) only for rank zero: the started rank would run with every core.
    threads = str(max(1, (os.cpu_count() or 1) // processes))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": threads}
    train = Path(sys.executable).parent / "train"
    proc = subprocess.run([str(train), *overrides], capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"{case} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def tokens_per_s(ranks: list[dict], batch: int, block: int) -> float:
    """Tokens of all ranks per second over the steps after the first (which pays one-off costs)."""
    step = max(statistics.median(r["step_times"][1:] or r["step_times"]) for r in ranks)
    return len(ranks) * batch * block / step


def tokens_per_cpu_s(ranks: list[dict], batch: int, block: int) -> float:
    """Tokens per CPU-second of all ranks together (median step after the first): what a busy machine disturbs least."""
    cpu = sum(statistics.median(r["step_cpu"][1:] or r["step_cpu"]) for r in ranks)
    return len(ranks) * batch * block / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="50m")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    parser.add_argument("--block", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one run may take")
    args = parser.parse_args()
    results: dict[str, list[list[dict]]] = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        numel = save_model(folder, args.size)
        hidden, layers, _ = SIZES[args.size]
        print(f"Llama {numel / 1e6:.1f}M parameters ({layers} layers, {hidden} wide), fp32, AdamW; "
              f"{args.steps} steps of {args.batch} x {args.block} tokens per rank; {os.cpu_count()} CPU cores")
        for i in range(args.repeats):
            for case in args.cases:  # alternated: the machine's noise falls on every case alike
                ranks = run_case(case, folder, Path(tmp) / f"{case.replace(' ', '_')}-{i}", args)
                results[case].append(ranks)
                print(f"repeat {i} {case:<9}: {tokens_per_s(ranks, args.batch, args.block):8.0f} tokens/s, "
                      f"{tokens_per_cpu_s(ranks, args.batch, args.block):6.0f} tokens/CPU-s", flush=True)
    mib = 2**20
    print(f"\n{'case':<10} {'rank':>4} {'threads':>7} {'params':>9} {'grads':>9} {'optim':>9} {'p+g+o':>9} "
          f"{'setup HWM':>9} {'VmHWM':>9} {'tokens/s':>9} {'tok/CPU-s':>9}")
    total: dict[str, float] = {}
    for case, runs in results.items():
        rate = statistics.median(tokens_per_s(r, args.batch, args.block) for r in runs)
        per_cpu = statistics.median(tokens_per_cpu_s(r, args.batch, args.block) for r in runs)
        for r in runs[-1]:
            pgo = (r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"]) / mib
            total[case] = max(total.get(case, 0.0), pgo)
            print(f"{case:<10} {r['rank']:>4} {r['threads']:>7} {r['param_bytes'] / mib:>5.0f} MiB "
                  f"{r['grad_bytes'] / mib:>5.0f} MiB {r['optim_bytes'] / mib:>5.0f} MiB {pgo:>5.0f} MiB "
                  f"{r['setup_VmHWM']:>5.0f} MiB {r['VmHWM']:>5.0f} MiB {rate:>9.0f} {per_cpu:>9.0f}")
    if "ddp" in total and "fsdp" in total:
        print(f"\nFSDP2 / DDP, per-rank parameters + gradients + optimizer state: {total['fsdp'] / total['ddp']:.3f} "
              "(target <= 0.55)")
        hwm = {c: max(r["VmHWM"] for r in results[c][-1]) for c in ("ddp", "fsdp")}
        print(f"FSDP2 / DDP, per-rank peak resident set (VmHWM): {hwm['fsdp'] / hwm['ddp']:.3f}")
    print("setup HWM: peak RSS when training starts (model loaded and sharded); VmHWM: peak RSS at the end")
    print("tok/CPU-s: all ranks' tokens per CPU-second of all ranks (on an idle machine tokens/s is about cores x this)")
    print("tokens/s: all ranks' tokens per second, median step after the first"
          + (f", median of {args.repeats} alternated repeats" if args.repeats > 1 else ""))


if __name__ == "__main__":
    main()
