"""dpo's TRL-family losses: each against its paper's formula by hand, then against TRL's own DPOTrainer.

The TRL parity half runs where trl is installed (`pip install -e ".[bench]"`): TRL's loss code runs
inside ``DPOTrainer._compute_loss``; a bare instance (``object.__new__``) with the attributes that
method reads, and stand-in models that return fixed per-token log-probs, run it on the same tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.plugins.text.dpo import divergences, losses
from modalforge.plugins.text.dpo.objective import DPOObjective

from dpo_cases import B, logsig, nc, nr, pc, pr, rc, rr, sig  # noqa: E402 - the shared hand-computed case


def by_hand(fn, n=2):
    return torch.tensor([fn(i) for i in range(n)])


def lc(i):
    return (pc[i] - rc[i]).item()


def lr(i):
    return (pr[i] - rr[i]).item()


def d(i):
    return lc(i) - lr(i)


# ---- each loss against its paper's formula --------------------------------------------------

def test_exo_pair():  # EXO eq. 16, K=2: sum_k q_k log(q_k / p_k), q = softmax(beta * rewards), p = (1-eps, eps)
    eps = 0.1

    def f(i):
        qw, ql = sig(B * d(i)), sig(-B * d(i))
        return qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps)

    torch.testing.assert_close(losses.exo_pair(pc - rc - (pr - rr), B, eps), by_hand(f))


def test_nca_bco_sppo_apo():
    torch.testing.assert_close(losses.nca_pair(pc - rc, pr - rr, B), by_hand(
        lambda i: -logsig(B * lc(i)) - 0.5 * logsig(-B * lc(i)) - 0.5 * logsig(-B * lr(i))))
    torch.testing.assert_close(losses.bco_pair(pc - rc, pr - rr, B), by_hand(
        lambda i: -logsig(B * lc(i)) - logsig(-B * lr(i))))
    torch.testing.assert_close(losses.sppo_hard(pc - rc, pr - rr, B), by_hand(
        lambda i: (lc(i) - 1 / (2 * B)) ** 2 + (lr(i) + 1 / (2 * B)) ** 2))
    torch.testing.assert_close(losses.apo_zero(pc - rc, pr - rr, B), by_hand(
        lambda i: (1 - sig(B * lc(i))) + sig(B * lr(i))))
    torch.testing.assert_close(losses.apo_down(pc - rc, pr - rr, B), by_hand(
        lambda i: sig(B * lc(i)) + (1 - sig(B * (lc(i) - lr(i))))))


def test_aot_sorts_across_the_batch():
    eps = 0.1
    policy = sorted((pc - pr).tolist())
    ref = sorted((rc - rr).tolist())
    expected = by_hand(lambda i: -(1 - eps) * logsig(B * (policy[i] - ref[i])) - eps * logsig(-B * (policy[i] - ref[i])))
    torch.testing.assert_close(losses.aot(pc, pr, rc, rr, B, eps), expected)
    chosen, rejected = sorted((pc - rc).tolist()), sorted((pr - rr).tolist())
    torch.testing.assert_close(losses.aot_unpaired(pc - rc, pr - rr, B), by_hand(
        lambda i: -logsig(B * (chosen[i] - rejected[i]))))


def test_discopop_and_sigmoid_norm():
    tau = 0.05

    def f(i):
        z = B * d(i)
        mix = sig(z / tau)
        return -logsig(z) * (1 - mix) + math.exp(-z) * mix

    torch.testing.assert_close(losses.discopop(pc - rc - (pr - rr), B, tau), by_hand(f))
    torch.testing.assert_close(losses.sigmoid_norm(pc - rc, pr - rr, nc, nr, B), by_hand(
        lambda i: -logsig(B * (lc(i) / nc[i].item() - lr(i) / nr[i].item()))))


def test_f_divergences():  # f'(t) at t = pi / pi_ref (f-DPO, Wang et al. 2023, table 1)
    x = torch.tensor([-0.7, 0.0, 1.3], dtype=torch.float64)
    t = x.exp()
    torch.testing.assert_close(divergences.f_prime(x, "reverse_kl"), x)
    torch.testing.assert_close(divergences.f_prime(x, "forward_kl"), 1 - 1 / t)
    torch.testing.assert_close(divergences.f_prime(x, "js_divergence"), torch.log(2 * t / (1 + t)))
    a = 0.3
    torch.testing.assert_close(divergences.f_prime(x, "alpha_divergence", a), (t ** (a - 1) - 1) / (a - 1))
    torch.testing.assert_close(divergences.f_prime(x, "alpha_divergence", 0.0), 1 - 1 / t)  # alpha=0 is forward KL


def test_ld_dpo_weights_the_verbose_tail():
    # pair: chosen has 2 completion tokens, rejected 4; the rejected's last 2 tokens are the verbose tail
    tokens = torch.tensor([[0.0, -1.0, -2.0, 0.0, 0.0], [0.0, -0.5, -0.5, -3.0, -4.0]])
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float)
    got = losses.length_desensitised(tokens, mask, 0.25)
    torch.testing.assert_close(got, torch.tensor([-3.0, -1.0 + 0.25 * -7.0]))
    torch.testing.assert_close(losses.length_desensitised(tokens, mask, None), torch.tensor([-3.0, -8.0]))


def test_wpo_weights_and_sft():
    tokens = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]])
    sum_sq = torch.tensor([[0.0, -0.3, -0.6], [0.0, -0.2, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]], dtype=torch.float)
    weight = math.exp(((-1.0 + 0.3) + (-2.0 + 0.6)) / 2) * math.exp(-0.5 + 0.2)
    torch.testing.assert_close(losses.wpo_weights(tokens, sum_sq, mask), torch.tensor([weight]))
    torch.testing.assert_close(losses.sft_nll(tokens, mask), torch.tensor([1.5]))


def test_cpo_is_reference_free_cdpo_plus_nll():
    tokens = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -0.5], [0.0, -3.0, 0.0], [0.0, -1.0, -1.5]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float)
    seq = (tokens * mask).sum(-1)
    zeros = torch.zeros(2)
    loss, _, _, _ = losses.paired_loss(["cpo"], [1.0], tokens, mask, zeros, zeros, beta=B, cpo_alpha=0.7)
    nll = (1.0 + 2.0 + 0.5 + 0.5) / 4
    expected = sum(-logsig(B * (seq[i] - seq[i + 2]).item()) for i in range(2)) / 2 + 0.7 * nll
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mpo_weights_sum_the_means():
    tokens = -torch.rand(4, 5)
    mask = torch.ones(4, 5)
    mask[:, 0] = 0
    ref_c, ref_r = -torch.rand(2) * 4, -torch.rand(2) * 4
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    loss, terms, _, _ = losses.paired_loss(names, weights, tokens * mask, mask, ref_c, ref_r, beta=B)
    alone = [losses.paired_loss([n], [1.0], tokens * mask, mask, ref_c, ref_r, beta=B)[0] for n in names]
    torch.testing.assert_close(loss, sum(w * x for w, x in zip(weights, alone)))
    assert set(terms) == set(names)


# ---- through the objective: a few steps learn -------------------------------------------------

def test_mpo_with_ld_dpo_and_wpo_conforms(tmp_path):
    from modalforge.testing import assert_plugin_conforms

    assert_plugin_conforms("dpo", tmp_path, ["optim.warmup_steps=0", "optim.lr=1e-2", "data.batch_size=32",
                                             "objective.loss=[sigmoid,bco_pair,sft]",
                                             "objective.loss_weights=[0.8,0.2,1.0]", "objective.ld_alpha=0.5",
                                             "objective.use_weighting=true"], steps=16, loss_window=4)


def test_cpo_builds_no_reference():
    objective = DPOObjective(loss="cpo", cpo_alpha=0.5)
    objective.set_adapter_target(nn.Linear(2, 2))
    assert objective.reference is None and objective.reference_mode == "none"


# ---- TR-DPO, dropout ---------------------------------------------------------------------------

def test_tr_dpo_soft_updates_the_reference_every_n_steps():
    objective = DPOObjective(sync_ref_model=True, ref_model_mixup_alpha=0.25, ref_model_sync_steps=2)
    policy = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.3))
    objective.set_adapter_target(policy)
    assert objective.reference is not None and objective.frozen_modules() == []  # changes, so it is checkpointed
    assert policy[1].p == 0.0  # disable_dropout defaults to true, as in TRL
    initial = objective.reference[0].weight.detach().clone()
    with torch.no_grad():
        policy[0].weight.add_(1.0)
    objective.after_optimizer_step()
    torch.testing.assert_close(objective.reference[0].weight, initial)  # step 1: not yet
    objective.after_optimizer_step()
    torch.testing.assert_close(objective.reference[0].weight, 0.25 * policy[0].weight + 0.75 * initial)
    assert int(objective.optimizer_steps) == 2 and "optimizer_steps" in objective.state_dict()


def test_dropout_kept_when_asked():
    policy = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.3))
    DPOObjective(disable_dropout=False).set_adapter_target(policy)
    assert policy[1].p == 0.3


# ---- bad input: one clear line each -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="dpo"), r"objective.loss='dpo' is not one of: sigmoid, cdpo, .*bco_pair.*kto"),
    (dict(loss=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2]),
     r"loss_weights has 2 weight\(s\) for 3 loss\(es\)"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5), r"f_alpha_divergence_coef=1.5 is out of range \[0.0, 1.0\]"),
    (dict(f_divergence_type="chi2"), r"f_divergence_type='chi2' is not one of: reverse_kl, forward_kl"),
    (dict(loss="bco_pair", f_divergence_type="js_divergence"), r"works only with the margin losses .* not bco_pair"),
    (dict(ld_alpha=-0.1), r"ld_alpha=-0.1 is out of range"),
    (dict(loss="exo_pair"), r"exo_pair needs 0 < label_smoothing < 1"),
    (dict(loss="robust", label_smoothing=0.5), r"label_smoothing=0.5 is out of range"),
    (dict(label_smoothing=0.1), r"no effect on sigmoid.*loss=cdpo"),
    (dict(loss="aot", use_weighting=True), r"cannot weight aot"),
    (dict(sync_ref_model=True, reference="precomputed"), r"sync_ref_model=true needs reference=copy"),
    (dict(loss=["kto", "sigmoid"]), r"kto is unpaired"),
])
def test_bad_options_are_one_line(kwargs, message):
    with pytest.raises(ModalforgeError, match=message) as info:
        DPOObjective(**kwargs)
    assert "\n" not in str(info.value)


# ---- parity with TRL's DPOTrainer ---------------------------------------------------------------

def _batch(seed: int = 0, pairs: int = 3, length: int = 7):
    """Per-token log-probs of a [chosen; rejected] batch with unequal completion lengths."""
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        start = 1 + row % 2
        end = length - (row * 2) % 3
        completion[row, start:end] = 1
    shifted = completion[:, 1:].float()
    policy = -torch.rand(2 * pairs, length - 1, generator=g, dtype=torch.float64).float() * 3 * shifted
    reference = -torch.rand(2 * pairs, length - 1, generator=g, dtype=torch.float64).float() * 3 * shifted
    sum_sq = -torch.rand(2 * pairs, length - 1, generator=g, dtype=torch.float64).float() * 2 * shifted
    return completion, policy, reference, sum_sq


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


class _FixedLM(nn.Module):
    """Stands in for a model patched with TRL's fused LM head: returns fixed per-token outputs."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs: torch.Tensor, log_sum_sq: torch.Tensor) -> None:
        super().__init__()
        self.log_probs, self.log_sum_sq = log_probs, log_sum_sq

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(log_probs=self.log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), log_sum_sq_probs=self.log_sum_sq)


def trl_loss(completion, policy, reference, sum_sq, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0,
             ld_alpha=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, use_weighting=False,
             discopop_tau=0.05) -> float:
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    trainer = object.__new__(trl_dpo.DPOTrainer)
    model = _FixedLM(policy, sum_sq)
    trainer.__dict__.update(
        model=model, ref_model=_FixedLM(reference, sum_sq), accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=False, loss_types=list(loss_type), loss_weights=loss_weights or [1.0] * len(loss_type),
        beta=beta, label_smoothing=label_smoothing, ld_alpha=ld_alpha, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion}
    return float(trainer._compute_loss(model, inputs, return_outputs=False))


def ours(completion, policy, reference, sum_sq, *, loss_type, loss_weights=None, ld_alpha=None, use_weighting=False,
         beta=0.1, **options) -> float:
    mask = completion[:, 1:].float()
    ref_c, ref_r = losses.length_desensitised(reference, mask, ld_alpha).chunk(2)
    loss, _, _, _ = losses.paired_loss(loss_type, loss_weights or [1.0] * len(loss_type), policy, mask, ref_c, ref_r,
                                       ld_alpha=ld_alpha, log_sum_sq=sum_sq if use_weighting else None, beta=beta,
                                       **options)
    return float(loss)


TRL_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
DELTA_LOSSES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
CASES = (
    [dict(loss_type=[name], label_smoothing=0.1 if name in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0)
     for name in TRL_LOSSES]
    + [dict(loss_type=[name], f_divergence_type=kind, f_alpha_divergence_coef=0.3, label_smoothing=0.1)
       for name in DELTA_LOSSES for kind in ("forward_kl", "js_divergence", "alpha_divergence")]
    + [dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
       dict(loss_type=["sigmoid", "ipo", "apo_zero"], ld_alpha=0.3),
       # (not sft with use_weighting: TRL 1.16 multiplies sft's expanded scalar in place and raises)
       dict(loss_type=["sigmoid", "sppo_hard", "apo_down"], use_weighting=True),
       dict(loss_type=["discopop", "nca_pair"], ld_alpha=0.0, use_weighting=True, beta=0.7, discopop_tau=0.2)]
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c["loss_type"]) + "".join(
    f"-{k}={v}" for k, v in c.items() if k not in ("loss_type", "label_smoothing", "f_alpha_divergence_coef")))
def test_matches_trl(case):
    data = _batch(seed=len(str(case)))
    expected = trl_loss(*data, **case)
    options = {k: v for k, v in case.items() if k not in ("loss_type",)}
    names = case["loss_type"]
    if options.get("label_smoothing") and not set(names) & {"robust", "exo_pair", "aot", "aot_unpaired"}:
        options["label_smoothing"] = 0.0  # TRL reads it only in those losses
    got = ours(*data, loss_type=names, **options)
    assert got == pytest.approx(expected, abs=1e-5, rel=1e-5)
