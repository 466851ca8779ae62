"""PPO's pieces as pure functions on ``(B, T)`` tensors (``mask`` 1 on completion tokens).

Follow TRL's ``PPOTrainer`` (and the N+ implementation details of RLHF with PPO, Huang et al. 2024):
per-token rewards are the KL penalty with the sequence's score added on its last token, advantages
come from GAE over the completion, are whitened, and the value loss is clipped around the old values.
"""

from __future__ import annotations

import torch


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over masked entries (unbiased variance); mean kept if not ``shift_mean``."""
    count = mask.sum()
    mean = (x * mask).sum() / count
    var = (((x - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r_t = -kl_coef (log pi - log ref)_t`` (k1), plus the sequence's score on its last token; and the KL."""
    kl = (logps - ref_logps) * mask if ref_logps is not None else torch.zeros_like(logps)
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: ``A_t = sum_k (gamma lam)^k delta_{t+k}``, ``delta_t = r_t + gamma V_{t+1} - V_t``.

    Values past the end of a completion count as 0. Returns (advantages, returns = advantages + values).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``max(-A r, -A clip(r, 1 - c, 1 + c))`` averaged over tokens; and the share of clipped tokens."""
    ratio = torch.exp(logps - old_logps)
    losses1, losses2 = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    count = mask.sum().clamp(min=1)
    return (torch.max(losses1, losses2) * mask).sum() / count, ((losses2 > losses1).float() * mask).sum() / count


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2)`` averaged over tokens; and the share clipped."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss1, loss2 = (values - returns) ** 2, (clipped - returns) ** 2
    count = mask.sum().clamp(min=1)
    return 0.5 * (torch.max(loss1, loss2) * mask).sum() / count, ((loss2 > loss1).float() * mask).sum() / count
