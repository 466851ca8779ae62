"""The preference losses, each a small function of per-sequence log-probabilities.

Notation: ``pc``/``pr`` are the policy's summed log-probabilities of the chosen /
rejected completion, ``rc``/``rr`` the reference's, ``nc``/``nr`` token counts.
The TRL-family losses take the chosen / rejected *rewards* ``uc``/``ur``: the
log-ratios ``pc - rc`` and ``pr - rr`` (reverse KL, plain DPO) or, for the losses
built on their difference, the f-divergence scores of :mod:`.divergences`; ``delta``
is ``uc - ur``. Every function returns per-example losses; tests check each against
its paper's formula computed by hand and, where trl is installed, against TRL's
``DPOTrainer`` on the same log-probabilities. Written here rather than imported from
TRL: TRL's losses live inside its Trainer classes and cannot be called on their own.

:func:`paired_loss` joins them: per-token log-probabilities in, one weighted sum of
losses out (TRL's ``loss_type`` list with ``loss_weights``), with LD-DPO's length
desensitisation and WPO's weighting.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from modalforge.plugins.text.dpo import divergences

# ---- the original eight ---------------------------------------------------------------


def dpo_sigmoid(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with ``label_smoothing`` > 0, conservative DPO (cDPO)."""
    return cdpo((pc - rc) - (pr - rr), beta, label_smoothing)


def dpo_robust(pc, pr, rc, rr, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under a preference-flip rate ``label_smoothing`` < 0.5."""
    return robust((pc - rc) - (pr - rr), beta, label_smoothing)


def ipo(pc, pr, rc, rr, nc, nr, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): squared distance of the length-averaged log-ratio margin to 1/(2 beta)."""
    h = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    return (h - 1 / (2 * beta)) ** 2


def hinge(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """SLiC-style hinge on the DPO margin: relu(1 - beta * h)."""
    return torch.relu(1 - beta * ((pc - pr) - (rc - rr)))


def simpo(pc, pr, nc, nr, beta: float, gamma_beta_ratio: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma.

    ``label_smoothing`` > 0 is TRL's CPO-trainer form (conservative, as cDPO)."""
    return cdpo(pc / nc - pr / nr - gamma_beta_ratio, beta, label_smoothing)


def orpo(pc, pr, nc, nr, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024): NLL of the chosen answer minus lam * log sigmoid(log odds ratio).

    Returns (per-example loss, per-example log odds ratio)."""
    avg_c, avg_r = pc / nc, pr / nr
    log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
    return -avg_c - lam * F.logsigmoid(log_odds), log_odds


def kto(policy, reference, kl_policy, kl_reference, desirable: torch.Tensor, beta: float,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024) on unpaired completions.

    The reference point z0 is the batch estimate of KL(policy || reference) from
    mismatched (prompt, completion) pairs, clamped at 0 and not differentiated.
    Returns (per-example loss, z0)."""
    z0 = (kl_policy - kl_reference).mean().clamp(min=0).detach()
    ratio = policy - reference
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))))
    return loss, z0


# ---- losses on the reward margin delta = uc - ur (these accept f-divergence scores) ----


def cdpo(delta, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO's sigmoid loss on a margin; ``label_smoothing`` eps > 0 gives cDPO (Mitchell 2023)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def robust(delta, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO on a margin: (-(1-eps) log s(b d) + eps log s(-b d)) / (1 - 2 eps)."""
    return (-(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)) / (
        1 - 2 * label_smoothing)


def exo_pair(delta, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO (Ji et al. 2024, eq. 16), K=2: KL(softmax(beta * rewards) || [1-eps, eps]) over {chosen, rejected}."""
    z = beta * delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


def discopop(delta, beta: float, tau: float) -> torch.Tensor:
    """DiscoPOP (Chan Lu et al. 2024, eq. 5): logistic and exponential losses mixed by sigmoid(beta*delta / tau)."""
    z = beta * delta
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def sigmoid_norm(uc, ur, nc, nr, beta: float) -> torch.Tensor:
    """DPO's sigmoid loss on the length-averaged rewards: -log s(beta * (uc/nc - ur/nr))."""
    return -F.logsigmoid(beta * (uc / nc - ur / nr))


def ipo_margin(uc, ur, nc, nr, beta: float) -> torch.Tensor:
    """IPO on (possibly f-divergence) rewards averaged over tokens: ((uc/nc - ur/nr) - 1/(2 beta))^2."""
    return (uc / nc - ur / nr - 1 / (2 * beta)) ** 2


def hinge_margin(delta, beta: float) -> torch.Tensor:
    """SLiC hinge on a margin: relu(1 - beta * delta)."""
    return torch.relu(1 - beta * delta)


# ---- losses on the separate log-ratios lc = pc - rc, lr = pr - rr ----------------------


def nca_pair(lc, lr, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024), K=2: -log s(b lc) - 1/2 log s(-b lc) - 1/2 log s(-b lr)."""
    return -F.logsigmoid(beta * lc) - 0.5 * F.logsigmoid(-beta * lc) - 0.5 * F.logsigmoid(-beta * lr)


def bco_pair(lc, lr, beta: float) -> torch.Tensor:
    """BCO (Jung et al. 2024) on pairs, with TRL's reward shift delta = 0: -log s(b lc) - log s(-b lr)."""
    return -F.logsigmoid(beta * lc) - F.logsigmoid(-beta * lr)


def sppo_hard(lc, lr, beta: float) -> torch.Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1/0: (lc - 1/2b)^2 + (lr + 1/2b)^2."""
    return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2


def apo_zero(lc, lr, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise chosen, lower rejected: 1 - s(b lc) + s(b lr)."""
    return 1 - torch.sigmoid(beta * lc) + torch.sigmoid(beta * lr)


def apo_down(lc, lr, beta: float) -> torch.Tensor:
    """APO-down (eq. 8): lower both, rejected more: s(b lc) + 1 - s(b (lc - lr))."""
    return torch.sigmoid(beta * lc) + 1 - torch.sigmoid(beta * (lc - lr))


def aot(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), paired: cDPO's loss on sorted(pc - pr) - sorted(rc - rr) across the batch."""
    delta = torch.sort(pc - pr, dim=0).values - torch.sort(rc - rr, dim=0).values
    return cdpo(delta, beta, label_smoothing)


def aot_unpaired(lc, lr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT, unpaired: cDPO's loss on sorted(lc) - sorted(lr) across the batch."""
    return cdpo(torch.sort(lc, dim=0).values - torch.sort(lr, dim=0).values, beta, label_smoothing)


# ---- per-token helpers: LD-DPO, WPO, the SFT term -----------------------------------------


def length_desensitised(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """Sequence log-probs of a [chosen; rejected] batch; with LD-DPO's ``ld_alpha`` (Liu et al. 2024), the
    tokens past the shorter completion of each pair count ``ld_alpha`` times.

    Args:
        token_logps: (2B, T) per-token log-probs, zero outside the completion.
        mask: (2B, T) completion mask (chosen rows first).
        ld_alpha: weight of the verbose tail; ``None`` sums every token (plain DPO)."""
    if ld_alpha is None:
        return (token_logps * mask).sum(-1)
    position = mask.cumsum(-1)
    lengths = mask.sum(-1)
    shared = torch.minimum(*lengths.chunk(2)).repeat(2)[:, None]
    in_shared = mask.bool() & (position <= shared)
    in_tail = mask.bool() & (position > shared)
    return (token_logps * in_shared).sum(-1) + ld_alpha * (token_logps * in_tail).sum(-1)


def wpo_weights(token_logps: torch.Tensor, log_sum_sq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO (Zhou et al. 2024, eq. 2) pair weights, without gradient: the product over chosen and rejected of
    exp(mean over tokens of log p(y_t) - log sum_v p(v)^2), the policy's aligned length-normalised probability."""
    with torch.no_grad():
        mean = ((token_logps - log_sum_sq) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        wc, wr = torch.exp(mean).chunk(2)
    return wc * wr


def sft_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the chosen completions' tokens (TRL's ``sft``; CPO's BC term),
    repeated per pair so it weights and averages like the other losses."""
    chosen, _ = token_logps.chunk(2)
    chosen_mask, _ = mask.chunk(2)
    return (-chosen[chosen_mask.bool()].mean()).expand(chosen.size(0))


# ---- the family behind one switch ---------------------------------------------------------

#: Losses on the reward margin: these take a non-default ``f_divergence_type`` (as in TRL).
F_DIVERGENCE_LOSSES = ("sigmoid", "cdpo", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
#: Losses that need no reference policy.
REFERENCE_FREE = ("simpo", "orpo", "cpo", "sft")
#: Every paired loss name: TRL's ``loss_type`` values, plus modalforge's cdpo, simpo, orpo and cpo.
PAIRED = ("sigmoid", "cdpo", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
          "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo", "cpo")
#: Losses that read ``label_smoothing``; WPO cannot weight the sorted (batch-permuted) AOT losses.
SMOOTHED = ("cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "cpo", "simpo")
SORTED = ("aot", "aot_unpaired")


def one_loss(name: str, token_logps: torch.Tensor, mask: torch.Tensor, pc, pr, rc, rr, *, beta: float,
             label_smoothing: float = 0.0, gamma_beta_ratio: float = 0.5, discopop_tau: float = 0.05,
             cpo_alpha: float = 1.0, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5) -> torch.Tensor:
    """Per-pair values of the loss ``name`` (see :data:`PAIRED`)."""
    nc, nr = mask.sum(-1).clamp(min=1).chunk(2)
    lc, lr = pc - rc, pr - rr
    uc, ur = divergences.scores(lc, lr, f_divergence_type, f_alpha_divergence_coef)
    delta = uc - ur
    if name == "sigmoid":
        return cdpo(delta, beta)
    if name == "cdpo":
        return cdpo(delta, beta, label_smoothing)
    if name == "robust":
        return robust(delta, beta, label_smoothing)
    if name == "ipo":
        return ipo_margin(uc, ur, nc, nr, beta)
    if name == "hinge":
        return hinge_margin(delta, beta)
    if name == "exo_pair":
        return exo_pair(delta, beta, label_smoothing)
    if name == "discopop":
        return discopop(delta, beta, discopop_tau)
    if name == "sigmoid_norm":
        return sigmoid_norm(uc, ur, nc, nr, beta)
    if name == "nca_pair":
        return nca_pair(lc, lr, beta)
    if name == "bco_pair":
        return bco_pair(lc, lr, beta)
    if name == "sppo_hard":
        return sppo_hard(lc, lr, beta)
    if name == "apo_zero":
        return apo_zero(lc, lr, beta)
    if name == "apo_down":
        return apo_down(lc, lr, beta)
    if name == "aot":
        return aot(pc, pr, rc, rr, beta, label_smoothing)
    if name == "aot_unpaired":
        return aot_unpaired(lc, lr, beta, label_smoothing)
    if name == "sft":
        return sft_nll(token_logps, mask)
    if name == "simpo":
        return simpo(pc, pr, nc, nr, beta, gamma_beta_ratio, label_smoothing)
    if name == "orpo":
        return orpo(pc, pr, nc, nr, beta)[0]
    if name == "cpo":  # CPO (Xu et al. 2024): reference-free (c)DPO term + cpo_alpha * NLL of the chosen
        return cdpo(pc - pr, beta, label_smoothing) + cpo_alpha * sft_nll(token_logps, mask)
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(PAIRED)}")


def paired_loss(names: Sequence[str], weights: Sequence[float], token_logps: torch.Tensor, mask: torch.Tensor,
                rc: torch.Tensor, rr: torch.Tensor, *, ld_alpha: float | None = None,
                log_sum_sq: torch.Tensor | None = None, **options) -> tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                               torch.Tensor, torch.Tensor]:
    """sum_i w_i * mean(loss_i) over a [chosen; rejected] batch, as TRL's ``DPOTrainer`` computes it.

    Args:
        names / weights: the losses (:data:`PAIRED`) and their weights.
        token_logps: (2B, T) policy per-token log-probs, zero outside the completion (chosen rows first).
        mask: (2B, T) completion mask.
        rc / rr: (B,) reference sequence log-probs (LD-weighted like the policy's; zeros when reference-free).
        ld_alpha: LD-DPO's weight of the tokens past the shorter completion (``None``: off).
        log_sum_sq: (2B, T) ``log sum_v p(v)^2`` per token; given, every loss is WPO-weighted.
        options: ``beta`` and the rest of :func:`one_loss`'s keywords.

    Returns (loss, each loss's mean, pc, pr): pc/pr the policy's (LD-weighted) sequence log-probs."""
    mask = mask.to(token_logps.dtype)
    pc, pr = length_desensitised(token_logps, mask, ld_alpha).chunk(2)
    weight = wpo_weights(token_logps, log_sum_sq, mask) if log_sum_sq is not None else None
    total, terms = 0.0, {}
    for name, w in zip(names, weights, strict=True):
        per_pair = one_loss(name, token_logps, mask, pc, pr, rc, rr, **options)
        if weight is not None:
            per_pair = per_pair * weight
        terms[name] = per_pair.mean()
        total = total + w * terms[name]
    return total, terms, pc, pr
