"""DPO family parity with TRL 1.16: every ``loss_type`` and option, on the same model and batch.

A tiny Llama (policy) and a perturbed copy (reference) score one [chosen; rejected]
batch. TRL's side is ``DPOTrainer._compute_loss`` itself, run on a bare instance
(``object.__new__``) holding the attributes it reads, with TRL's fused LM head
patched onto both models, so TRL computes its own per-token log-probs. modalforge's
side is its objective's path: ``token_logps`` and ``losses.paired_loss``. Prints one
row per case with both losses and their difference. Needs ``pip install -e ".[bench]"``.

    python benchmarks/dpo_trl_parity.py
"""

from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import torch


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def batch(pairs: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded [chosen; rejected] rows: a prompt, a completion of varying length, padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (2 * pairs, length), generator=g)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for row in range(2 * pairs):
        prompt, end = 2 + row % 3, length - (row * 5) % 4
        attention[row, :end] = 1
        completion[row, prompt:end] = 1
    return {"input_ids": ids * attention, "attention_mask": attention, "completion_mask": completion}


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(model):
        return model


def trl_value(policy, reference, inputs, case: dict) -> float:
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = object.__new__(DPOTrainer)
    names = case["loss_type"]
    trainer.__dict__.update(
        model=policy, ref_model=reference, accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=False, loss_types=names, loss_weights=case.get("loss_weights") or [1.0] * len(names),
        beta=case.get("beta", 0.1), label_smoothing=case.get("label_smoothing", 0.0), ld_alpha=case.get("ld_alpha"),
        f_divergence_type=case.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=case.get("f_alpha_divergence_coef", 0.5), use_weighting=case.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=case.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    with torch.no_grad():
        return float(trainer._compute_loss(policy, dict(inputs), return_outputs=False))


def ours_value(policy, reference, inputs, case: dict) -> float:
    from modalforge.plugins.text.dpo import losses
    from modalforge.plugins.text.dpo.objective import token_logps

    names = case["loss_type"]
    ld_alpha = case.get("ld_alpha")
    options = {k: case[k] for k in ("beta", "label_smoothing", "discopop_tau", "f_divergence_type",
                                    "f_alpha_divergence_coef") if k in case}
    options.setdefault("beta", 0.1)
    if not set(names) & {"robust", "exo_pair", "aot", "aot_unpaired"}:
        options["label_smoothing"] = 0.0  # TRL reads it only in those
    with torch.no_grad():
        tokens, mask, sum_sq = token_logps(policy, inputs, with_sum_sq=case.get("use_weighting", False))
        ref_tokens, _, _ = token_logps(reference, inputs)
        rc, rr = losses.length_desensitised(ref_tokens, mask.float(), ld_alpha).chunk(2)
        loss, _, _, _ = losses.paired_loss(names, case.get("loss_weights") or [1.0] * len(names), tokens, mask, rc, rr,
                                           ld_alpha=ld_alpha, log_sum_sq=sum_sq, **options)
    return float(loss)


CASES = (
    [{"loss_type": [n], **({"label_smoothing": 0.1} if n in ("robust", "exo_pair", "aot", "aot_unpaired") else {})}
     for n in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")]
    + [{"loss_type": ["sigmoid"], "f_divergence_type": k, "f_alpha_divergence_coef": 0.3}
       for k in ("forward_kl", "js_divergence", "alpha_divergence")]
    + [{"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
       {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
       {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
       {"loss_type": ["sigmoid", "apo_zero"], "use_weighting": True},
       {"loss_type": ["discopop"], "discopop_tau": 0.2, "beta": 0.5}]
)


def reference_and_trl_copies(policy):  # noqa: ANN001, ANN201 - HF causal LMs
    """(reference, TRL's policy, TRL's reference): a reference that differs from the policy, so the
    log-ratios are not zero, and copies of both patched with TRL's fused LM head, through which TRL scores
    (modalforge's side keeps the plain forward)."""
    from trl.trainer.utils import add_fused_lm_head

    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trl_policy, trl_reference = copy.deepcopy(policy), copy.deepcopy(reference)
    add_fused_lm_head(trl_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    add_fused_lm_head(trl_reference)
    return reference, trl_policy, trl_reference


def main() -> None:

    policy = tiny_llama(0)
    reference, trl_policy, trl_reference = reference_and_trl_copies(policy)
    inputs = batch()
    worst = 0.0
    print(f"{'case':<72} {'TRL':>12} {'modalforge':>12} {'|diff|':>9}")
    for case in CASES:
        label = "+".join(case["loss_type"]) + "".join(f" {k}={v}" for k, v in case.items() if k != "loss_type")
        expected = trl_value(trl_policy, trl_reference, inputs, case)
        got = ours_value(policy, reference, inputs, case)
        worst = max(worst, abs(expected - got))
        print(f"{label:<72} {expected:12.6f} {got:12.6f} {abs(expected - got):9.2e}")
    print(f"\n{len(CASES)} cases; largest |TRL - modalforge| = {worst:.2e} (tolerance 1e-5)")


if __name__ == "__main__":
    main()
