"""f-DPO (Wang et al. 2023): the regulariser between policy and reference as an f-divergence.

DPO's implicit reward beta * log(pi/pi_ref) comes from the reverse KL; a divergence f
gives the reward beta * f'(pi/pi_ref) instead. ``scores`` returns f'(t) of the chosen
and rejected ratios t = exp(log-ratio), with TRL's names and parametrisation. The
reparametrisation leaves a beta * log Z(x) term that cancels only in the chosen minus
rejected difference, so only the losses built on that difference accept a divergence
other than ``reverse_kl`` (:data:`.losses.F_DIVERGENCE_LOSSES`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: exp overflows beyond this in each dtype (TRL's clamp, kept for identical results).
_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}


def f_prime(log_ratio: torch.Tensor, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(t) at t = exp(``log_ratio``).

    - ``reverse_kl``: f(t) = t log t, f'(t) = log t + 1 (the constant cancels): log t;
    - ``forward_kl``: f(t) = -log t, f'(t) = 1 - 1/t;
    - ``js_divergence``: f'(t) = log(2t / (1 + t)) = log 2 + log sigmoid(log t);
    - ``alpha_divergence``: f'(t) = (t^(alpha-1) - 1) / (alpha - 1), alpha in [0, 1]: forward KL at 0,
      reverse KL in the limit alpha -> 1.
    """
    if kind == "reverse_kl":
        return log_ratio
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return log_ratio
        t = torch.clamp(((alpha - 1.0) * log_ratio).float(), max=_CLAMP.get(log_ratio.dtype, 80.0))
        return (torch.exp(t) - 1.0).to(log_ratio.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}; known: {', '.join(DIVERGENCES)}")


def scores(chosen_log_ratio: torch.Tensor, rejected_log_ratio: torch.Tensor, kind: str = "reverse_kl",
           alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """f'(pi/pi_ref) of the chosen and of the rejected completions."""
    return f_prime(chosen_log_ratio, kind, alpha), f_prime(rejected_log_ratio, kind, alpha)
