"""The preference losses, each a small function of per-sequence log-probabilities.

Notation: ``pc``/``pr`` are the policy's summed log-probabilities of the chosen /
rejected completion, ``rc``/``rr`` the reference's, ``nc``/``nr`` token counts.
Every function returns per-example losses; tests check each against its paper's
formula computed by hand. Written here rather than imported from TRL: TRL's losses
live inside its Trainer classes and cannot be called on their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_sigmoid(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023); with ``label_smoothing`` > 0, conservative DPO (cDPO)."""
    h = (pc - pr) - (rc - rr)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def dpo_robust(pc, pr, rc, rr, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under a preference-flip rate ``label_smoothing`` < 0.5."""
    h = (pc - pr) - (rc - rr)
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
        1 - 2 * label_smoothing)


def ipo(pc, pr, rc, rr, nc, nr, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): squared distance of the length-averaged log-ratio margin to 1/(2 beta)."""
    h = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    return (h - 1 / (2 * beta)) ** 2


def hinge(pc, pr, rc, rr, beta: float) -> torch.Tensor:
    """SLiC-style hinge on the DPO margin: relu(1 - beta * h)."""
    return torch.relu(1 - beta * ((pc - pr) - (rc - rr)))


def simpo(pc, pr, nc, nr, beta: float, gamma_beta_ratio: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma."""
    return -F.logsigmoid(beta * (pc / nc - pr / nr) - gamma_beta_ratio * beta)


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
