"""GRPO-family advantages and losses as small pure functions on tensors.

Shapes: ``B`` completions, ``T`` completion tokens. ``logps``/``old_logps``/``ref_logps``
are per-token log-probabilities ``(B, T)`` of the sampled tokens, ``mask`` is ``(B, T)``
(1 on completion tokens that count), ``advantages`` is ``(B,)``.

The definitions follow TRL 1.16's ``GRPOTrainer`` (``_generate_and_score_completions``
for advantages, ``_compute_loss`` for losses) so the same names mean the same maths;
``tests/test_grpo.py`` checks each against the paper's formula by hand and, where trl
is installed, against trl's own code. Written here rather than imported because trl's
versions are methods of its Trainer, not functions.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LossType = Literal["grpo", "dapo", "dr_grpo", "bnpo", "rloo", "cispo", "sapo", "luspo", "vespo", "online_dpo",
                   "online_ipo"]
#: Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): pairs sampled
#: from the policy and judged by the rewards, trained with the DPO (sigmoid) or IPO loss, as TRL's OnlineDPOTrainer.
ONLINE_DPO = ("online_dpo", "online_ipo")
ScaleRewards = Literal["group", "batch", "none"]
ISLevel = Literal["token", "sequence"]
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation (as trl's ``nanstd``), NaN-free inputs."""
    return x.std(dim=dim, unbiased=True) if x.numel() > 1 else torch.zeros(())


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_std(x: torch.Tensor) -> torch.Tensor:
    """``_std`` over ``x`` of every rank (one all_reduce of count, sum and sum of squares), as trl
    computes it over the rewards it gathers from all processes; ``_std`` itself on one process."""
    if _world_size() == 1:
        return _std(x)
    import torch.distributed as dist

    values = x.detach().double()
    stats = torch.stack([torch.tensor(float(values.numel()), dtype=torch.float64, device=x.device),
                         values.sum(), (values * values).sum()])
    dist.all_reduce(stats)
    n, total, squares = stats.unbind()
    if n <= 1:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return ((squares - total * total / n) / (n - 1)).clamp(min=0.0).sqrt().to(x.dtype)


def per_rank_share(count: torch.Tensor | float) -> float:
    """``count`` summed over ranks, divided by the number of ranks (trl's ``num_items_in_batch /
    num_processes``): with DDP averaging gradients, each rank's sum / this is the global token mean."""
    world = _world_size()
    if world == 1:
        return float(count)
    import torch.distributed as dist

    device = count.device if isinstance(count, torch.Tensor) else None
    total = torch.as_tensor(count, dtype=torch.float64, device=device).detach().clone().reshape(())
    dist.all_reduce(total)
    return float(total) / world


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: ScaleRewards = "group",
                     eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``A_i = (r_i - mean(group)) / (std + eps)``; std of the group, of the whole batch, or none.

    ``batch``: the std of the rewards of every rank's batch when several processes train (as trl's).

    Returns the advantages and, per completion, the std used (zero std marks a group with one reward).
    """
    grouped = rewards.view(-1, num_generations)
    mean = grouped.mean(1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = global_std(rewards).expand_as(rewards)
    else:
        std = (grouped.std(1, unbiased=True) if num_generations > 1 else torch.zeros(len(grouped), device=rewards.device)
               ).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + eps)
    return advantages, std


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j`` within each group of ``G``."""
    grouped = rewards.view(-1, num_generations)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - baseline).reshape(-1)


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), per token: ``exp(ref - pi) - (ref - pi) - 1`` (>= 0)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def log_importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor,
                           level: ISLevel = "token") -> torch.Tensor:
    """``log(pi/pi_old)`` per token ``(B, T)``, or its masked mean per sequence ``(B, 1)`` (GSPO)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


ISMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def sampling_importance_ratio(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor,
                              mode: ISMode = "sequence_mask", clip_min: float | None = None,
                              clip_max: float | None = 3.0) -> torch.Tensor:
    """Correction for rollouts sampled by another engine (vLLM): ``pi_old / pi_sampler``, truncated or masked."""
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = clip_min if clip_min is not None else -math.inf
    high = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


@torch.no_grad()
def vespo_weights(advantages: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
                  is_ratio: torch.Tensor | None = None, k_pos: float = 2.0, lambda_pos: float = 3.0,
                  k_neg: float = 3.0, lambda_neg: float = 2.0) -> torch.Tensor:
    """VESPO's gamma weight ``phi(w) = exp(lambda + k log w - lambda w)`` of the sequence ratio ``w`` (detached)."""
    lower = math.log(1e-8)
    seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
    if is_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(is_ratio), lower, 20.0).sum(-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def per_token_policy_loss(loss_type: LossType, logps: torch.Tensor, old_logps: torch.Tensor,
                          advantages: torch.Tensor, mask: torch.Tensor, *, epsilon_low: float = 0.2,
                          epsilon_high: float = 0.2, delta: float | None = None, level: ISLevel = "token",
                          sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                          vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
                          is_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy-gradient term per token, before the KL penalty and aggregation; and the ratio ``coef_1``.

    - clipped (grpo, dapo, dr_grpo, bnpo, luspo): ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``, with
      ``r`` capped at ``delta`` first when two-sided clipping is on;
    - cispo: ``-sg(min(r, eps_high)) A log pi``; sapo: ``-4/tau sigmoid(tau (r - 1)) A``;
    - vespo: ``-phi(w) A log pi``;
    - rloo: the clipped term on the whole sequence's ratio ``exp(sum log pi - sum log pi_old)``.
    """
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    if loss_type == "rloo":
        coef_1 = torch.exp(((logps - old_logps) * mask).sum(1, keepdim=True))
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        return -torch.min(coef_1 * adv, coef_2 * adv), coef_1
    log_ratio = logps - old_logps
    coef_1 = torch.exp(log_importance_weights(logps, old_logps, mask, level))
    if loss_type == "cispo":
        loss = -torch.clamp(coef_1, max=epsilon_high).detach() * adv * logps
    elif loss_type in CLIPPED:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        capped = torch.clamp(coef_1, max=delta) if delta is not None else coef_1
        loss = -torch.min(capped * adv, coef_2 * adv)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        loss = -vespo_weights(adv, log_ratio, mask, is_ratio, *vespo) * adv * logps
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    if is_ratio is not None and loss_type != "vespo":
        loss = loss * is_ratio
    return loss, coef_1


def aggregate(loss_type: LossType, per_token: torch.Tensor, mask: torch.Tensor, *,
              max_completion_length: int | None = None, num_items: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce ``(B, T)`` (or ``(B, 1)``) per-token losses to a scalar as each paper normalises.

    - grpo, sapo: mean over each sequence's tokens, then over sequences (sequence-level);
    - bnpo: mean over the minibatch's tokens; dr_grpo: sum / (B * max_completion_length);
    - dapo, cispo, vespo: sum / ``num_items`` (the tokens of the whole generation batch per optimiser step);
    - luspo: sum over each sequence, then mean over sequences; rloo: mean over sequences.
    """
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else per_token.shape[1]
        return (per_token * mask).sum() / (per_token.size(0) * length)
    if loss_type in ("dapo", "cispo", "vespo"):
        total = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=per_token.dtype)
        return (per_token * mask).sum() / total.clamp(min=1.0)
    if loss_type == "luspo":
        return (per_token * mask).sum(-1).mean()
    if loss_type == "rloo":
        return per_token.mean() if per_token.shape[1] == 1 else (per_token * mask).sum(-1).mean()
    raise ValueError(f"unknown loss type {loss_type!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over counted tokens; a ``(B, 1)`` tensor counts once per sequence."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(loss_type: LossType, logps: torch.Tensor, old_logps: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, ref_logps: torch.Tensor | None = None, beta: float = 0.0,
              entropies: torch.Tensor | None = None, entropy_coef: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, delta: float | None = None, level: ISLevel = "token",
              max_completion_length: int | None = None, num_items: torch.Tensor | float | None = None,
              sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
              vespo: tuple[float, float, float, float] = (2.0, 3.0, 3.0, 2.0),
              is_ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole loss of one minibatch (policy term + ``beta`` KL - ``entropy_coef`` entropy) and its statistics.

    ``old_logps=None`` means on-policy (one optimiser step per rollout): the ratio is 1 with the right gradient.
    For ``rloo`` the KL penalty belongs in the reward (see :func:`rloo_advantages`), not here.
    """
    old_logps = logps.detach() if old_logps is None else old_logps
    per_token, coef_1 = per_token_policy_loss(
        loss_type, logps, old_logps, advantages, mask, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        delta=delta, level=level, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo=vespo, is_ratio=is_ratio)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0 and ref_logps is not None and loss_type != "rloo":
        kl = per_token_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate(loss_type, per_token, mask, max_completion_length=max_completion_length, num_items=num_items)
    if entropy_coef and entropies is not None:
        loss = loss - entropy_coef * (entropies * mask).sum() / mask.sum().clamp(min=1.0)
    if entropies is not None:
        stats["entropy"] = masked_mean(entropies.detach(), mask)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = coef_1.detach()
    if loss_type in (*CLIPPED, "rloo"):
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
        stats["clip_ratio/low"] = masked_mean(low, mask)
        stats["clip_ratio/high"] = masked_mean(high, mask)
        stats["clip_ratio/region"] = masked_mean(torch.maximum(low, high), mask)
    elif loss_type == "cispo":
        stats["clip_ratio/region"] = masked_mean(((ratio > epsilon_high) & (adv > 0)).float(), mask)
    return loss, stats


def online_dpo_loss(loss_type: str, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                    rewards: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Online DPO / IPO over consecutive completion pairs (two per prompt), judged by ``rewards``.

    The better-rewarded completion of each pair is *chosen*; with ``h = (log pi(c) - log pi(r)) -
    (log ref(c) - log ref(r))`` on sequence log-probs, the loss is ``-log sigmoid(beta h)`` (DPO) or
    ``(h - 1 / (2 beta))^2`` (IPO), as TRL's OnlineDPOTrainer computes them. Pairs whose rewards tie
    teach nothing and are left out of the mean (``decided`` is the share kept).
    """
    policy = (logps * mask).sum(1).view(-1, 2)
    reference = (ref_logps * mask).sum(1).view(-1, 2)
    judged = rewards.view(-1, 2)
    chosen = (judged[:, 1] > judged[:, 0]).long()[:, None]
    decided = (judged[:, 0] != judged[:, 1]).float()
    h = (policy.gather(1, chosen) - policy.gather(1, 1 - chosen)).squeeze(1) - (
        reference.gather(1, chosen) - reference.gather(1, 1 - chosen)).squeeze(1)
    if loss_type == "online_dpo":
        per_pair = -torch.nn.functional.logsigmoid(beta * h)
    elif loss_type == "online_ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"not an online DPO loss: {loss_type!r}")
    loss = (per_pair * decided).sum() / decided.sum().clamp(min=1.0)
    stats = {"online_dpo/margin": (beta * h * decided).sum().detach() / decided.sum().clamp(min=1.0),
             "online_dpo/decided": decided.mean().detach(),
             "online_dpo/accuracy": ((h > 0).float() * decided).sum().detach() / decided.sum().clamp(min=1.0)}
    return loss, stats
