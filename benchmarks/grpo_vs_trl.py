"""GRPO throughput and peak memory: `train plugin=grpo` against TRL's GRPOTrainer, same policy, prompts and reward.

Both train the same tiny Llama (saved once to a folder both load) on the arithmetic demo prompts with the
dense `digits` reward, with the same G, prompts per step, completion length, sampling, beta (frozen reference
copy), loss type, AdamW settings and learning rate. Each run is its own process, so its peak resident memory
(VmHWM) is its own; runs alternate (paired repeats) because the machines are noisy. First a parity check:
TRL's `_compute_loss` and modalforge's `grpo_loss` on the same rollout (same model, advantages, reference
log-probs), which also checks that both take the same per-token log-probs from the model.

Gradient checkpointing is the same on both sides (``--gradient-checkpointing off|on``; TRL's GRPOConfig
defaults it to on, modalforge to off). Figures and a per-step profile of both: plugins/text/grpo/README.md.

    pip install -e ".[bench]"
    python benchmarks/grpo_vs_trl.py --steps 20 --repeats 5 --gradient-checkpointing off
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

PROMPTS, G, LENGTH, BETA, LR = 8, 4, 8, 0.04, 1e-3
CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def policy_dir(root: Path) -> Path:
    """A tiny Llama and the demo's tokenizer (chatml template) saved where both trainers load them."""
    folder = root / "policy"
    if folder.exists():
        return folder
    import torch

    from modalforge.text.models import build_causal_lm
    from modalforge.rl.prompts import arithmetic_tokenizer

    tokenizer = arithmetic_tokenizer(os.environ.get("MODALFORGE_CACHE"))
    torch.manual_seed(0)
    model = build_causal_lm(config=dict(CONFIG), vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def prompts() -> list[dict]:
    from modalforge.rl.prompts import synthetic_folder

    path = synthetic_folder(os.environ.get("MODALFORGE_CACHE")) / "prompts_train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def trl_config(out: str, steps: int, checkpointing: bool = False):  # noqa: ANN201
    from trl import GRPOConfig

    # gradient_checkpointing is set explicitly: TRL's GRPOConfig defaults it to True (recomputing every block's
    # forward in the backward), modalforge to false; both sides run with the same setting
    return GRPOConfig(output_dir=out, use_cpu=True, gradient_checkpointing=checkpointing, report_to=[],
                      save_strategy="no", logging_steps=10 ** 6,
                      max_steps=steps, per_device_train_batch_size=PROMPTS * G, num_generations=G,
                      max_completion_length=LENGTH, temperature=1.0, top_p=1.0, top_k=0, beta=BETA, loss_type="grpo",
                      learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, seed=0, bf16=False,
                      dataloader_num_workers=0, disable_tqdm=True)


def run_trl(folder: Path, steps: int, checkpointing: bool) -> float:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from modalforge.rl.rewards import digits

    class Timer(TrainerCallback):
        start = end = None
        steps = 0

        def on_step_begin(self, *args, **kwargs):  # noqa: ANN002, ANN003
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):  # noqa: ANN002, ANN003
            self.steps += 1
            self.end = time.perf_counter()

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in prompts()]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(model=str(folder), reward_funcs=digits, args=trl_config(out, steps, checkpointing),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return (timer.steps - 1) / (timer.end - timer.start)


def run_modalforge(folder: Path, steps: int, checkpointing: bool) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import framework_rate

    return framework_rate(["plugin=grpo", "model=grpo/pretrained", f"model.name_or_path={folder}",
                           f"trainer.max_steps={steps}", "objective.rewards=[digits]", f"data.batch_size={PROMPTS}",
                           f"objective.num_generations={G}", f"objective.max_completion_length={LENGTH}",
                           f"objective.beta={BETA}", "objective.reference=copy", "objective.loss=grpo",
                           f"optim.lr={LR}", "optim.scheduler=constant", "optim.warmup_steps=0",
                           "optim.weight_decay=0.0", "trainer.gradient_clip_val=1.0", "trainer.log_every_n_steps=1000",
                           f"module.gradient_checkpointing={str(checkpointing).lower()}", "seed=0"])


def parity(folder: Path) -> float:
    """|TRL loss - modalforge loss| on one rollout of the policy, through each one's own log-prob code."""
    import torch
    from transformers import AutoTokenizer

    from modalforge.config import compose
    from modalforge.plugins.text.grpo import losses
    from modalforge.run import build_components, build_module

    with tempfile.TemporaryDirectory() as out:
        from datasets import Dataset
        from trl import GRPOTrainer

        from modalforge.rl.rewards import digits

        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in prompts()[:64]]
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        trainer = GRPOTrainer(model=str(folder), reward_funcs=digits, args=trl_config(out, 1),
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        cfg = compose(["plugin=grpo", "model=grpo/pretrained", f"model.name_or_path={folder}",
                       f"data.batch_size={PROMPTS}", f"objective.num_generations={G}", "objective.rewards=[digits]",
                       f"objective.max_completion_length={LENGTH}", f"objective.beta={BETA}", "objective.reference=copy"])
        dm, objective, adapter = build_components(cfg)
        module = build_module(cfg, objective, adapter)
        dm.setup()
        objective.connect(dm)
        module.configure_model()
        objective.reference.load_state_dict(trainer.model.state_dict())
        batch = next(iter(dm.train_dataloader()))
        # the policy a few updates away from its reference, so the KL term and the advantages both count
        torch.manual_seed(1)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.02 * torch.randn_like(param))
        objective.model.load_state_dict(trainer.model.state_dict())
        rollout = objective._new_rollout(batch)
        ours = objective.training_step(batch).loss
        inputs = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                  "completion_ids": rollout.completion_ids, "completion_mask": rollout.attention_mask,
                  "advantages": rollout.advantages, "ref_per_token_logps": rollout.ref_logps,
                  "num_items_in_batch": rollout.completion_mask.sum()}
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() otherwise
        theirs = trainer._compute_loss(trainer.model, inputs)
        direct, _ = losses.grpo_loss("grpo", objective._logps(objective.model, rollout)[0], None, rollout.advantages,
                                     rollout.completion_mask, ref_logps=rollout.ref_logps, beta=BETA)
        print(f"loss on one rollout: TRL {float(theirs):.8f}, modalforge {float(ours):.8f} (direct {float(direct):.8f})")
        return abs(float(theirs) - float(ours))


def child(kind: str, folder: Path, steps: int, checkpointing: bool) -> None:
    rate = (run_trl if kind == "trl" else run_modalforge)(folder, steps, checkpointing)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak
    peak_mb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:")) / 1024
    print(json.dumps({"completions_s": rate * PROMPTS * G, "updates_s": rate, "peak_mb": peak_mb}))


def measure(kind: str, folder: Path, steps: int, checkpointing: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", str(folder), "--steps", str(steps),
                          "--gradient-checkpointing", "on" if checkpointing else "off"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off",
                        help="the same on both sides (TRL's GRPOConfig defaults to on, modalforge to off)")
    args = parser.parse_args()
    checkpointing = args.gradient_checkpointing == "on"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args.child, Path(args.folder), args.steps, checkpointing)
        return
    with tempfile.TemporaryDirectory() as root:
        os.environ.setdefault("MODALFORGE_CACHE", str(Path(root) / "cache"))
        folder = policy_dir(Path(root))
        gap = parity(folder)
        print(f"parity |TRL - modalforge| = {gap:.2e} ({'ok' if gap < 1e-5 else 'MISMATCH'}, target < 1e-5)\n")
        print(f"gradient checkpointing: {args.gradient_checkpointing} on both sides")
        results: dict[str, list[dict]] = {"modalforge": [], "trl": []}
        for i in range(args.repeats):
            for kind in results:
                results[kind].append(measure(kind, folder, args.steps, checkpointing))
                r = results[kind][-1]
                print(f"repeat {i}: {kind:<10} {r['completions_s']:7.1f} completions/s, {r['updates_s']:6.2f} updates/s, "
                      f"peak {r['peak_mb']:7.1f} MB")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("completions_s", "updates_s", "peak_mb")}
           for k, v in results.items()}
    ratios = [m["updates_s"] / t["updates_s"] for m, t in zip(results["modalforge"], results["trl"])]
    print()
    for k, v in med.items():
        print(f"{k:<10}: {v['completions_s']:7.1f} completions/s, {v['updates_s']:6.2f} updates/s, "
              f"peak resident memory {v['peak_mb']:7.1f} MB (median of {args.repeats})")
    print(f"\nthroughput modalforge / TRL: {statistics.median(ratios):.2f} (median of paired repeats; target >= 1.0)")
    print(f"peak memory modalforge / TRL: {med['modalforge']['peak_mb'] / med['trl']['peak_mb']:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
