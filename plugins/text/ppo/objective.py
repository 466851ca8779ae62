"""ppo objective: policy + scalar value head on its trunk, GAE, per-token KL penalty, clipped losses.

It stands on the core's online-RL loop (:class:`modalforge.rl.RolloutObjective`), as grpo
does: the same prompts, generation, rewards (functions or ``reward_model:/path``), reference
modes, rollout buffer, checkpointed position and exact resume; the rollout additionally holds the value head's
estimates and the GAE returns. Each rollout is optimised for ``num_ppo_epochs`` passes of
``num_mini_batches`` minibatches, one minibatch per training step (automatic optimisation).
The value head is a ``Linear(hidden, 1)`` on the policy's last hidden state (no second model
in memory); it trains in full under any adapter and is saved as ``value_head.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from modalforge.rl.objective import RolloutObjective
from modalforge.rl.rollout import Rollout
from modalforge.plugins.text.ppo import losses


class PPOObjective(RolloutObjective):
    """PPO for causal LMs (TRL's ``PPOTrainer`` names).

    Args:
        model: the ``model`` config (default: the cached SFT'd arithmetic policy).
        rewards / reward_weights: functions, files, ``reward_model:/path`` (:mod:`modalforge.rl.rewards`).
        num_generations: completions per prompt (1 is usual for PPO).
        kl_coef: per-token KL penalty in the reward (k1: log pi_old - log ref); 0 builds no reference.
        reference: ``auto``, ``copy``, ``adapter``, ``none`` (:class:`modalforge.rl.RolloutObjective`).
        cliprange / cliprange_value: policy ratio and value clip ranges.
        vf_coef: weight of the value loss.
        gamma / lam: GAE discount and lambda.
        whiten_rewards: whiten the per-token rewards before GAE (advantages are always whitened).
        missing_eos_penalty: subtracted from the score of completions with no stop token.
        num_ppo_epochs / num_mini_batches: passes over each rollout, minibatches (optimiser steps) per pass.
        max_completion_length / temperature / top_p / top_k / generation_batch_size: sampling.
        seed: seeds each rollout's sampling.
    """

    min_generations = 1

    def __init__(self, model: Mapping[str, Any] | None = None, rewards: list[Any] | None = None,
                 reward_weights: list[float] | None = None, num_generations: int = 1, kl_coef: float = 0.05,
                 reference: Literal["auto", "copy", "adapter", "none"] = "auto", cliprange: float = 0.2,
                 cliprange_value: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95,
                 whiten_rewards: bool = False, missing_eos_penalty: float | None = None, num_ppo_epochs: int = 4,
                 num_mini_batches: int = 1, max_completion_length: int = 6, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, generation_batch_size: int | None = None, seed: int = 0) -> None:
        super().__init__(model, rewards=rewards, reward_weights=reward_weights, num_generations=num_generations,
                         beta=kl_coef, reference=reference, num_iterations=num_ppo_epochs,
                         steps_per_generation=num_mini_batches, max_completion_length=max_completion_length,
                         temperature=temperature, top_p=top_p, top_k=top_k,
                         generation_batch_size=generation_batch_size, seed=seed)
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.gamma, self.lam, self.whiten_rewards = gamma, lam, whiten_rewards
        self.missing_eos_penalty = missing_eos_penalty
        self.value_head: nn.Linear | None = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.value_head is None:
            hidden = self.model.config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.normal_(self.value_head.weight, std=1 / (hidden + 1) ** 0.5)
            nn.init.zeros_(self.value_head.bias)

    # ---- one forward: log-probs, entropies and values -------------------------------
    def _forward(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        mask = torch.cat([r.prompt_mask, r.attention_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        length = r.completion_ids.shape[1]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         output_hidden_states=True, logits_to_keep=length + 1)
        logits = out.logits[:, -length - 1:-1].float() / self.temperature
        log_probs = torch.log_softmax(logits, -1)
        logps = log_probs.gather(-1, r.completion_ids[..., None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        hidden = out.hidden_states[-1][:, -length - 1:-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logps, entropy, values

    def _new_rollout(self, batch: dict[str, Any]) -> Rollout:
        rollout, scores, truncated, metrics = self._sample(batch)
        scores = scores.nan_to_num(0.0).to(rollout.completion_ids.device)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * truncated.float()
        with torch.no_grad():
            parts = [self._forward(rollout.select(i)) for i in
                     torch.arange(len(rollout), device=scores.device).split(self.generation_batch_size or len(rollout))]
            rollout.old_logps = torch.cat([p[0] for p in parts])
            rollout.values = torch.cat([p[2] for p in parts])
            if self.beta != 0:
                rollout.ref_logps = self._frozen_logps(rollout, reference=True)
        mask = rollout.completion_mask
        rewards, kl = losses.token_rewards(scores, rollout.old_logps, rollout.ref_logps, mask, self.beta)
        if self.whiten_rewards:
            rewards = losses.whiten(rewards, mask, shift_mean=False) * mask
        advantages, rollout.returns = losses.gae(rewards, rollout.values, mask, self.gamma, self.lam)
        rollout.advantages = losses.whiten(advantages, mask) * mask
        rollout.num_items = float(mask.sum()) / self.steps_per_generation
        metrics.update({"kl": float(kl.sum(1).mean()), "non_score_reward": float((-self.beta * kl).sum(1).mean()),
                        "score": float(scores.mean()), "values/mean": float((rollout.values * mask).sum() / mask.sum())})
        self._rollout_metrics = metrics
        return rollout

    def _loss(self, part: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, entropy, values = self._forward(part)
        mask = part.completion_mask
        pg, pg_clipped = losses.policy_loss(logps, part.old_logps, part.advantages, mask, self.cliprange)
        vf, vf_clipped = losses.value_loss(values, part.values, part.returns, mask, self.cliprange_value)
        count = mask.sum().clamp(min=1)
        stats = {"policy_loss": pg.detach(), "value_loss": vf.detach(), "clip_ratio/policy": pg_clipped,
                 "clip_ratio/value": vf_clipped, "entropy": (entropy.detach() * mask).sum() / count,
                 "approx_kl": (0.5 * ((logps.detach() - part.old_logps) ** 2) * mask).sum() / count}
        return pg + self.vf_coef * vf, stats

    def save_artifacts(self, directory: str | Path) -> None:
        from safetensors.torch import save_model

        if self.value_head is not None:
            save_model(self.value_head, str(Path(directory) / "value_head.safetensors"))
