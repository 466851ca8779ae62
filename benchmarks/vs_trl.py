"""modalforge against TRL 1.16: `train plugin=sft` vs SFTTrainer (with and without packing), `train plugin=dpo` vs DPOTrainer.

Both sides train the same Llama (saved once to a folder both load, with the demo's tokenizer and chat
template) on the same conversational records (arithmetic prompt-completion chats; preference pairs for
DPO), with the same batch size, maximum length, optimizer (AdamW, torch's fused kernel: TRL's default
and modalforge's), learning rate, constant schedule, gradient clipping (1.0), precision (fp32) and number
of steps, logging every 10 steps, no checkpoints. TRL runs with gradient checkpointing off (its SFT
default is on) and fp32 (its default is bf16).

Before timing, a parity check on one batch of the same records, through each side's own code:
- SFT: the input ids and loss masks of TRL's tokenisation against modalforge's (identical but for one
  token per record: TRL also learns the newline the chatml template writes after `<|im_end|>`, modalforge
  learns each answer and its end-of-turn marker only), and the loss (TRL's `compute_loss` against the `sft`
  objective's loss, on TRL's batch) on the same weights: target |diff| <= 1e-6.
- DPO: sigmoid, IPO and hinge losses (TRL's `_compute_loss` against modalforge's `paired_loss`)
  on the same batch and the same reference log-probs: target |diff| <= 1e-5 (the full family is in
  benchmarks/dpo_trl_parity.py).

Timing: each run is its own process (whole-process wall time: imports, tokenisation, model, training,
teardown) and the sides alternate, each repeat in the other order (the machine is noisy). Steady state:
input tokens per second (padding excluded, the same definition as `train/tokens_per_s`) and pairs per
second for DPO, after the first `--warmup` steps, and each process's peak resident memory (VmHWM). Prints
each figure, and modalforge / TRL ratios (target >= 1.2 in every row, at equal loss; peak memory <= 1.0).
`sft_compiled`: unpacked sft compiled, modalforge's `module.compile=true` (each decoder block, in place)
against TRL's `torch_compile=True` (the whole model); the warm-up steps hold the compilation.

Packing differs in layout: TRL's default ("bfd", padding-free) flattens a batch into one row with position
ids; modalforge packs first-fit rows of `max_length` with a block-diagonal mask (`data.packing=true`). Both
keep the examples apart on CPU with transformers 5 (it derives the boundaries from the position ids), and
the tokens/s of each counts real tokens only.

    pip install -e ".[bench]"
    python benchmarks/vs_trl.py --steps 60 --repeats 3 [--size 10m]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, MAX_LENGTH, LR, BETA, LOG_EVERY = 8, 256, 1e-3, 0.1, 10
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "10m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2),
}
MODES = ("sft", "sft_packed", "sft_compiled", "dpo")


# ---- shared setup -----------------------------------------------------------------------------------------------
def prepare(root: Path, size: str, records: int = 2000) -> Path:
    """The model + tokenizer folder and the jsonl files both sides read."""
    import random

    import torch

    from modalforge.text.models import build_causal_lm
    from modalforge.text.synthetic import question, wrong
    from modalforge.plugins.text.sft.data import SFTDataModule

    folder = root / f"model-{size}"
    rng = random.Random(0)
    sft, pairs = [], []
    for _ in range(records):
        q, answer = question(rng)
        prompt = [{"role": "user", "content": q}]
        sft.append({"prompt": prompt, "completion": [{"role": "assistant", "content": str(answer)}]})
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": str(answer)}],
                      "rejected": [{"role": "assistant", "content": str(wrong(answer, rng))}]})
    for name, rows in (("sft", sft), ("pairs", pairs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    dm = SFTDataModule(cache_dir=str(root / "cache"))  # the demo's byte-level BPE and chatml template
    dm.setup()
    tokenizer = dm.processor
    torch.manual_seed(0)
    model = build_causal_lm(config={"model_type": "llama", "max_position_embeddings": 512, "tie_word_embeddings": True,
                                    **SIZES[size]},
                            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def modalforge_overrides(mode: str, root: Path, folder: Path, steps: int) -> list[str]:
    plugin = "dpo" if mode == "dpo" else "sft"
    data = "pairs" if mode == "dpo" else "sft"
    common = [f"plugin={plugin}", f"model={plugin}/pretrained", f"model.name_or_path={folder}",
              f"data.train={root / f'{data}.jsonl'}", f"data.val={root / f'{data}_val.jsonl'}",
              f"data.batch_size={BATCH}", f"data.max_length={MAX_LENGTH}", f"optim.lr={LR}", "optim.scheduler=constant",
              "optim.warmup_steps=0", "optim.weight_decay=0.0", "optim.betas=[0.9,0.999]", "optim.eps=1e-8",
              "optim.implementation=fused", "trainer.gradient_clip_val=1.0", "trainer.precision=32-true",
              "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.max_steps={steps}",
              f"trainer.log_every_n_steps={LOG_EVERY}", "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
              "trainer.enable_model_summary=false", "checkpoint.every_n_train_steps=1000000",
              "checkpoint.export_on_end=false", "module.num_samples=0", "seed=0"]
    if mode == "dpo":
        return [*common, "objective.loss=sigmoid", f"objective.beta={BETA}", "objective.reference=copy"]
    compiled = ["module.compile=true"] if mode == "sft_compiled" else []  # each decoder block, in place
    return [*common, f"data.packing={'true' if mode == 'sft_packed' else 'false'}", *compiled]


def trl_args(mode: str, out: str, steps: int):  # noqa: ANN201
    common = dict(output_dir=out, use_cpu=True, report_to=[], save_strategy="no", logging_steps=LOG_EVERY,
                  max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                  optim="adamw_torch_fused", max_grad_norm=1.0, seed=0, bf16=False, fp16=False,
                  gradient_checkpointing=False, dataloader_num_workers=0, max_length=MAX_LENGTH)
    if mode == "dpo":
        from trl import DPOConfig

        return DPOConfig(**common, beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=False)
    from trl import SFTConfig

    return SFTConfig(**common, packing=mode == "sft_packed", torch_compile=mode == "sft_compiled")  # whole model


def trl_trainer(mode: str, root: Path, folder: Path, out: str, steps: int, callbacks=(), records=None):  # noqa: ANN001, ANN201
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    data = "pairs" if mode == "dpo" else "sft"
    rows = records or [json.loads(line) for line in (root / f"{data}.jsonl").read_text().splitlines()]
    if mode == "dpo":
        from trl import DPOTrainer

        return DPOTrainer(model=model, args=trl_args(mode, out, steps), train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=list(callbacks))
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=trl_args(mode, out, steps), train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=list(callbacks))


def tokens_of(batch: dict) -> int:
    """Input tokens of a collated batch, padding excluded (padding-free rows have none)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


# ---- parity -----------------------------------------------------------------------------------------------------
def sft_parity(root: Path, folder: Path) -> tuple[float, bool]:
    """(|TRL loss - modalforge loss|, identical ids and masks) on the first 8 records, unpacked."""
    import torch

    from modalforge.config import compose
    from modalforge.data.readers import read_records
    from modalforge.plugins.text.sft.objective import token_loss_and_accuracy
    from modalforge.run import build_components

    records = [json.loads(line) for line in (root / "sft.jsonl").read_text().splitlines()[:BATCH]]
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer("sft", root, folder, out, 1, records=records)
        theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
        (Path(out) / "first.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        cfg = compose([*modalforge_overrides("sft", root, folder, 1), f"data.train={Path(out) / 'first.jsonl'}",
                       f"data.val={Path(out) / 'first.jsonl'}"])
        dm, objective, _ = build_components(cfg)
        dm.setup()
        first = read_records(str(Path(out) / "first.jsonl"), what="parity")
        items = dm._tokenize([dm.parse(r) for r in first], "parity")
        ours = dm.collate([[item] for item in items])
        same_ids = theirs["input_ids"].shape == ours["input_ids"].shape and torch.equal(
            theirs["input_ids"] * theirs["attention_mask"], ours["input_ids"] * ours["attention_mask"])
        # The one known difference: TRL (prompt-completion records) also learns the newline the chatml template
        # writes after <|im_end|>; modalforge learns each answer and its end-of-turn marker only (issue 22).
        newline = dm.processor.convert_tokens_to_ids(dm.processor.tokenize("\n"))[-1]
        extra = (theirs["labels"] != -100) & (ours["labels"] == -100)
        only_newline = bool(same_ids and torch.equal(ours["labels"] != -100, (theirs["labels"] != -100) & ~extra)
                            and (theirs["input_ids"][extra] == newline).all())
        if not only_newline:
            print("SFT tokens differ: TRL ids/labels vs modalforge's on the same records (first row):")
            print("  TRL       ", theirs["input_ids"][0].tolist(), (theirs["labels"][0] != -100).int().tolist())
            print("  modalforge", ours["input_ids"][0].tolist(), (ours["labels"][0] != -100).int().tolist())
        model = trainer.model
        model.train()
        with torch.no_grad():  # the loss functions compared on TRL's batch: the same tokens, the same mask
            trl_loss = float(trainer.compute_loss(model, {k: v for k, v in theirs.items()}))
            logits = model(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"], use_cache=False).logits
            our_loss = float(token_loss_and_accuracy(logits, theirs["labels"])[0])
    print(f"SFT loss on one batch of {BATCH} (TRL's batch through both losses): TRL {trl_loss:.8f}, modalforge "
          f"{our_loss:.8f}; ids {'identical' if same_ids else 'DIFFER'}, loss masks "
          f"{'identical but for TRL also learning the newline after <|im_end|> (' + str(int(extra.sum())) + ' tokens)' if only_newline else 'DIFFER'}")
    return abs(trl_loss - our_loss), only_newline


def dpo_parity(root: Path, folder: Path) -> dict[str, float]:
    """|TRL - modalforge| for sigmoid, IPO and hinge on one modalforge DPO batch, same reference log-probs."""
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from dpo_trl_parity import ours_value, reference_and_trl_copies, trl_value  # the family's parity lives there

    from modalforge.config import compose
    from modalforge.run import build_components

    cfg = compose(modalforge_overrides("dpo", root, folder, 1))
    dm, _, _ = build_components(cfg)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    policy = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    reference, trl_policy, trl_reference = reference_and_trl_copies(policy)
    gaps = {}
    for name in ("sigmoid", "ipo", "hinge"):
        case = {"loss_type": [name], "beta": BETA}
        theirs, ours = trl_value(trl_policy, trl_reference, inputs, case), ours_value(policy, reference, inputs, case)
        gaps[name] = abs(theirs - ours)
        print(f"DPO {name:<8} loss: TRL {theirs:.8f}, modalforge {ours:.8f}, |diff| {gaps[name]:.2e}"
              f"{'' if gaps[name] <= 1e-5 else '  <- formula differs'}")
    return gaps


# ---- timed runs (one process each) ------------------------------------------------------------------------------
def steady(times: list[float], tokens: list[int], warmup: int) -> tuple[float, float]:
    """(tokens/s, steps/s) over the steps after ``warmup``; times[i] ends step i, tokens[i] is its input tokens."""
    elapsed = times[-1] - times[warmup]
    return sum(tokens[warmup + 1:len(times)]) / elapsed, (len(times) - 1 - warmup) / elapsed


def child_modalforge(mode: str, root: Path, folder: Path, steps: int, warmup: int) -> tuple[float, float]:
    import lightning as L

    import modalforge.run as run_mod
    from modalforge.config import compose

    class Steps(L.Callback):
        times: list[float] = []
        tokens: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, *args):  # noqa: ANN001, ANN002
            self.times.append(time.perf_counter())
            self.tokens.append(int(pl_module.last_num_tokens))

    timer = Steps()
    with tempfile.TemporaryDirectory() as out:
        run_mod.run(compose(modalforge_overrides(mode, root, folder, steps)), out, callbacks=[timer])
    return steady(timer.times, timer.tokens, warmup)


def child_trl(mode: str, root: Path, folder: Path, steps: int, warmup: int) -> tuple[float, float]:
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, *args, **kwargs):  # noqa: ANN002, ANN003
            self.times.append(time.perf_counter())

    timer, tokens = Steps(), []
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(mode, root, folder, out, steps, callbacks=[timer])
        collate = trainer.data_collator

        def counting(examples):  # noqa: ANN001, ANN202 - the i-th batch collated is the i-th step's
            batch = collate(examples)
            tokens.append(tokens_of(batch))
            return batch

        trainer.data_collator = counting
        trainer.train()
    return steady(timer.times, tokens, warmup)


def peak_resident_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child would report its parent's peak."""
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:")) / 1024


def run_child(side: str, mode: str, root: Path, folder: Path, steps: int, warmup: int, threads: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--mode", mode, "--root", str(root),
                           "--folder", str(folder), "--steps", str(steps), "--warmup", str(warmup),
                           "--threads", str(threads)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{side} {mode} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in every run (0: torch's default)")
    parser.add_argument("--child", default=None)
    parser.add_argument("--mode", default=None)
    parser.add_argument("--root", default=None)
    parser.add_argument("--folder", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MODALFORGE_QUIET", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        fn = child_trl if args.child == "trl" else child_modalforge
        tokens_s, steps_s = fn(args.mode, Path(args.root), Path(args.folder), args.steps, args.warmup)
        print(json.dumps({"tokens_s": tokens_s, "steps_s": steps_s, "peak_mb": peak_resident_mb()}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MODALFORGE_CACHE"] = str(root / "cache")
        folder = prepare(root, args.size)
        sft_gap, same = sft_parity(root, folder)
        dpo_gaps = dpo_parity(root, folder)
        print(f"parity: SFT |diff| {sft_gap:.2e} ({'ok' if sft_gap <= 1e-6 and same else 'MISMATCH'}, target 1e-6); "
              f"DPO largest |diff| {max(dpo_gaps.values()):.2e} "
              f"({'ok' if max(dpo_gaps.values()) <= 1e-5 else 'MISMATCH'}, target 1e-5)\n", flush=True)
        modes = args.modes.split(",")
        results = {(m, s): [] for m in modes for s in ("modalforge", "trl")}
        for i in range(args.repeats):
            for mode in modes:
                sides = ("modalforge", "trl") if i % 2 == 0 else ("trl", "modalforge")
                for side in sides:
                    r = run_child(side, mode, root, folder, args.steps, args.warmup, args.threads)
                    results[(mode, side)].append(r)
                    unit = f"{r['steps_s'] * BATCH:8.1f} pairs/s" if mode == "dpo" else f"{r['tokens_s']:8.0f} tokens/s"
                    print(f"repeat {i}: {mode:<12} {side:<10} {unit}, {r['steps_s']:6.2f} steps/s, "
                          f"peak {r['peak_mb']:7.1f} MB, process wall {r['wall_s']:6.1f} s", flush=True)
    print(f"\n{args.size} Llama, batch {BATCH}, max length {MAX_LENGTH}, fp32, fused AdamW, {args.steps} steps "
          f"(first {args.warmup} excluded from the rates); medians of {args.repeats} paired repeats")
    print(f"{'mode':<13}{'modalforge':>16}{'TRL':>16}{'ratio':>8}   peak MB (modalforge / TRL, ratio)"
          "   process wall s (modalforge / TRL)")
    for mode in modes:
        ours, theirs = results[(mode, "modalforge")], results[(mode, "trl")]
        key = "steps_s" if mode == "dpo" else "tokens_s"
        scale = BATCH if mode == "dpo" else 1
        unit = "pairs/s" if mode == "dpo" else "tok/s"
        ratio = statistics.median(a[key] / b[key] for a, b in zip(ours, theirs))
        peaks = [statistics.median(r["peak_mb"] for r in side) for side in (ours, theirs)]
        print(f"{mode:<13}{statistics.median(r[key] for r in ours) * scale:>10.1f} {unit:<6}"
              f"{statistics.median(r[key] for r in theirs) * scale:>9.1f} {unit:<6}{ratio:>7.2f}   "
              f"{peaks[0]:7.1f} / {peaks[1]:7.1f} ({peaks[0] / peaks[1]:.2f}, target <= 1.0)   "
              f"{statistics.median(r['wall_s'] for r in ours):6.1f} / {statistics.median(r['wall_s'] for r in theirs):6.1f}"
              f"  (target ratio >= 1.2)")


if __name__ == "__main__":
    main()
