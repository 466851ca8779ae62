"""Peak resident memory of loading a saved ~100M-parameter Llama and of one training step, per adapter.

A Llama is built from a ``LlamaConfig`` (768 wide, 12 layers, 16k vocabulary: ~110M parameters),
saved once to a temp dir in fp32 with ``save_pretrained``, and then each case runs in a fresh
subprocess so that peaks do not mix: the process's peak RSS (``VmHWM``) after importing
everything, after loading, and after one training step (forward, backward, optimizer step).
The cases go through modalforge's own path (``build_model`` of ``build_causal_lm`` under
``pretrained_loading``, the adapter, ``enable_gradient_checkpointing``, ``build_optimizer``):

- ``full``: fp32 weights, every parameter trained, AdamW;
- ``lora``: fp32 base, LoRA r=16 on every linear layer;
- ``qlora``: the base loaded straight in 4 bits (NF4, ``BitsAndBytesConfig`` at ``from_pretrained``) + LoRA;
- ``qlora+gc`` / ``full+gc``: the same with ``module.gradient_checkpointing=true``.

Printed: a table of the peaks (and of the growth over the import baseline), and each case's
ratio to ``full`` measured in the same run.

    python benchmarks/memory.py                       # all cases, batch 2 x 512 tokens
    python benchmarks/memory.py --cases full qlora --seq 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("full", "full+gc", "lora", "qlora", "qlora+gc")


def peak_mib() -> float:
    """This process's peak resident set so far, in MiB.

    Linux's ``VmHWM`` belongs to the address space, which ``exec`` replaces, so a case's subprocess
    starts from zero; ``ru_maxrss`` would carry the parent's peak (the saved model) across ``exec``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def save_model(folder: Path, vocab: int, hidden: int, layers: int, intermediate: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_case(case: str, folder: str, batch: int, seq: int) -> dict:
    """One case, in this (fresh) process."""
    import torch

    from modalforge.adapters import FullAdapter, LoraAdapter, QLoraAdapter, enable_gradient_checkpointing, pretrained_loading
    from modalforge.models import build_model
    from modalforge.optim import build_optimizer

    import bitsandbytes  # noqa: F401 - imported before the baseline, as are the model classes
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    torch.set_num_threads(os.cpu_count() or 1)
    kind, _, flag = case.partition("+")
    adapter = {"full": FullAdapter, "lora": lambda: LoraAdapter(r=16, alpha=32),
               "qlora": lambda: QLoraAdapter(r=16, alpha=32)}[kind]()
    baseline = peak_mib()
    start = time.perf_counter()
    with pretrained_loading(adapter, "32-true"):
        model = build_model({"_target_": "modalforge.text.models.build_causal_lm",
                             "name_or_path": folder})
    model = adapter.apply(model, "all-linear")
    if flag == "gc":
        enable_gradient_checkpointing(model)
    model.train()
    loaded = peak_mib()
    load_s = time.perf_counter() - start
    four_bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    optimizer = build_optimizer(model.named_parameters(), {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0})
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"case": case, "baseline": baseline, "load": loaded, "step": peak_mib(), "loss": loss.item(),
            "four_bit_layers": four_bit, "trainable": trainable, "load_s": load_s, "step_s": step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.model, args.batch, args.seq)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        params = save_model(folder, args.vocab, args.hidden, args.layers, args.intermediate)
        print(f"Llama {params / 1e6:.0f}M parameters ({args.layers} layers, {args.hidden} wide, vocab {args.vocab}), "
              f"saved fp32 ({sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.0f} MiB); "
              f"one step on {args.batch} x {args.seq} tokens; {os.cpu_count()} CPU cores")
        rows = []
        for case in args.cases:
            out = subprocess.run([sys.executable, __file__, "--case", case, "--model", str(folder),
                                  "--batch", str(args.batch), "--seq", str(args.seq)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"case {case} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    full = next((r for r in rows if r["case"] == "full"), rows[0])
    print(f"\n{'case':<10} {'trainable':>10} {'4-bit':>6} {'load peak':>10} {'step peak':>10} "
          f"{'load +':>8} {'step +':>8} {'load/full':>10} {'step/full':>10} {'step s':>7} {'loss':>7}")
    for r in rows:
        print(f"{r['case']:<10} {r['trainable'] / 1e6:>9.1f}M {r['four_bit_layers']:>6} {r['load']:>7.0f} MiB "
              f"{r['step']:>6.0f} MiB {r['load'] - r['baseline']:>4.0f} MiB {r['step'] - r['baseline']:>4.0f} MiB "
              f"{r['load'] / full['load']:>10.2f} {r['step'] / full['step']:>10.2f} {r['step_s']:>7.1f} {r['loss']:>7.3f}")
    print("\npeaks: the process's peak RSS after loading and after one step; '+': growth over the import "
          f"baseline ({rows[0]['baseline']:.0f} MiB: Python, torch, transformers, bitsandbytes)")


if __name__ == "__main__":
    main()
