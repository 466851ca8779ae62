"""grpo objective: a group of completions per prompt, group-relative advantages, TRL's loss family.

The sampling, rewards, reference policy and checkpointed rollout buffer are the core's
(:class:`modalforge.rl.RolloutObjective`); this file is grpo's way from rewards to
advantages (group-relative, or RLOO's leave-one-out ones; dynamic sampling; the importance
correction of rollouts another engine sampled) and its losses (:mod:`.losses`).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

import torch

from modalforge.errors import ModalforgeError
from modalforge.rl.objective import RolloutObjective
from modalforge.rl.rollout import Rollout
from modalforge.plugins.text.grpo import losses
from modalforge.plugins.text.grpo.losses import ISLevel, LossType, ScaleRewards

log = logging.getLogger(__name__)
DynamicSampling = Literal["off", "drop", "refill"]
#: objective.dynamic_sampling's values; true is the old behaviour, drop
DYNAMIC_SAMPLING: dict[Any, DynamicSampling] = {False: "off", None: "off", "false": "off", "off": "off", "none": "off",
                                               True: "drop", "true": "drop", "drop": "drop", "refill": "refill"}


class GRPOObjective(RolloutObjective):
    """Group-relative policy optimisation and its variants, by TRL's names.

    Args:
        model: the ``model`` config (default: the cached SFT'd arithmetic policy; any ``build_causal_lm`` config).
        rewards: reward specs: built-ins (``exact_match``, ``format``, ``length``, ``digits``, ``overlong``,
            ``math_verify``), ``pkg.module:fn``,
            ``path/file.py:fn``, ``reward_model:/path``; or mappings ``{reward, weight, name, **kwargs}``.
        reward_weights: one weight per reward (TRL's name); default 1 each.
        loss: ``grpo``, ``dapo``, ``dr_grpo``, ``bnpo``, ``rloo``, ``cispo``, ``sapo``, ``luspo``, ``vespo``; or
            ``online_dpo`` / ``online_ipo`` (TRL's OnlineDPOTrainer: a pair per prompt, judged by the rewards,
            trained with the DPO / IPO loss against the reference; needs num_generations=2 and beta > 0).
        num_generations: completions per prompt (G).
        scale_rewards: divide advantages by the ``group``'s reward std, the ``batch``'s, or ``none`` (Dr. GRPO).
        beta: weight of the KL penalty to the reference (0: no reference is built or run); for the online DPO
            losses, DPO's beta.
        reference: ``auto`` (adapter-disabled under PEFT, else a frozen copy; none when beta=0), ``copy``,
            ``adapter``, ``none``.
        epsilon / epsilon_high: lower / upper clip range (``epsilon_high`` > ``epsilon``: DAPO's clip-higher;
            for cispo the ratio cap).
        delta: two-sided clipping: cap the ratio at ``delta`` on negative advantages too.
        num_iterations: passes over each rollout (mu); old log-probs are kept for the ratio.
        steps_per_generation: minibatches (optimiser steps) per pass; must divide batch x G.
        importance_sampling_level: ``token`` or ``sequence`` (GSPO).
        entropy_coef: entropy bonus weight.
        mask_truncated_completions: completions without a stop token do not count in the loss.
        dynamic_sampling: DAPO's dynamic sampling of groups whose rewards are all equal (no advantage): ``false``
            (off), ``drop`` (or ``true``: train on the others, the batch shrinks), ``refill`` (draw further prompt
            groups from the training stream until the batch has ``data.batch_size`` informative groups).
        max_refill_rounds: refill draws after the first at most; then the rollout trains on what it has.
        max_completion_length / temperature / top_p / top_k: sampling (``top_k=0``: off).
        generation_batch_size: completions per ``generate`` call (memory); a multiple of num_generations.
        sapo_temperature_pos / sapo_temperature_neg: SAPO's soft-gate temperatures.
        vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg: VESPO's gamma weights.
        seed: seeds each rollout's sampling with (seed, rollout number).
        rollout_func: ``pkg.module:fn`` or ``file.py:fn`` sampling the training rollouts instead of the policy's
            ``generate`` (TRL's ``rollout_func``): ``fn(prompts, objective) -> {"completion_ids": [[int]],
            "logprobs": [[float]] | None}``, ``num_generations`` completions per prompt in order; the prompts'
            tokens are ``objective.rollout_inputs`` (left-padded ids and mask). ``logprobs`` are the sampler's.
        vllm_importance_sampling_correction / vllm_importance_sampling_mode / vllm_importance_sampling_clip_min /
            vllm_importance_sampling_clip_max: TRL's correction for rollouts sampled by another engine: when the
            rollout has the sampler's log-probs, each token's loss is weighted by pi_old / pi_sampler (token or
            sequence level, truncated to or masked outside [clip_min, clip_max]).
    """

    #: a group-relative baseline needs two completions per prompt
    min_generations = 2

    def __init__(self, model: Mapping[str, Any] | None = None, rewards: list[Any] | None = None,
                 reward_weights: list[float] | None = None, loss: LossType = "grpo", num_generations: int = 8,
                 scale_rewards: ScaleRewards = "group", beta: float = 0.04,
                 reference: Literal["auto", "copy", "adapter", "none"] = "auto", epsilon: float = 0.2,
                 epsilon_high: float | None = None, delta: float | None = None, num_iterations: int = 1,
                 steps_per_generation: int = 1, importance_sampling_level: ISLevel = "token",
                 entropy_coef: float = 0.0, mask_truncated_completions: bool = False,
                 dynamic_sampling: bool | Literal["drop", "refill"] = False, max_refill_rounds: int = 3,
                 max_completion_length: int = 8, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generation_batch_size: int | None = None, sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
                 vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, seed: int = 0,
                 rollout_func: str | None = None, vllm_importance_sampling_correction: bool = True,
                 vllm_importance_sampling_mode: losses.ISMode = "sequence_mask",
                 vllm_importance_sampling_clip_min: float | None = None,
                 vllm_importance_sampling_clip_max: float | None = 3.0) -> None:
        choices = LossType.__args__  # type: ignore[attr-defined]
        if loss not in choices:
            raise ModalforgeError(f"objective.loss={loss!r} is not one of: {', '.join(choices)}")
        if scale_rewards not in ("group", "batch", "none"):
            raise ModalforgeError(f"objective.scale_rewards={scale_rewards!r} is not one of: group, batch, none")
        mode = DYNAMIC_SAMPLING.get(dynamic_sampling.lower() if isinstance(dynamic_sampling, str)
                                    else dynamic_sampling) if isinstance(dynamic_sampling, (bool, str, type(None))) \
            else None
        if mode is None:
            raise ModalforgeError(f"objective.dynamic_sampling={dynamic_sampling!r} is not one of: false, drop, refill "
                                  "(true: drop)")
        if isinstance(max_refill_rounds, bool) or not isinstance(max_refill_rounds, int) or max_refill_rounds < 0:
            raise ModalforgeError(f"objective.max_refill_rounds={max_refill_rounds!r} must be a whole number >= 0")
        if importance_sampling_level not in ("token", "sequence"):
            raise ModalforgeError(f"objective.importance_sampling_level={importance_sampling_level!r} is not one of: "
                                  "token, sequence")
        super().__init__(model, rewards=rewards, reward_weights=reward_weights, num_generations=num_generations,
                         beta=beta, reference=reference, num_iterations=num_iterations,
                         steps_per_generation=steps_per_generation,
                         mask_truncated_completions=mask_truncated_completions,
                         max_completion_length=max_completion_length, temperature=temperature, top_p=top_p,
                         top_k=top_k, generation_batch_size=generation_batch_size, seed=seed,
                         rollout_func=rollout_func)
        if loss in losses.ONLINE_DPO and (num_generations != 2 or beta <= 0 or num_iterations != 1
                                          or steps_per_generation != 1 or mode != "off"):
            raise ModalforgeError(f"objective.loss={loss} samples one pair per prompt and updates on it once: it needs "
                                  "objective.num_generations=2, objective.beta > 0 (the DPO beta, against the "
                                  "reference), num_iterations=1, steps_per_generation=1 and dynamic_sampling=false")
        self.loss_type, self.scale_rewards = loss, scale_rewards
        self.epsilon_low, self.epsilon_high = epsilon, epsilon_high if epsilon_high is not None else epsilon
        self.delta, self.level, self.entropy_coef = delta, importance_sampling_level, entropy_coef
        self.dynamic_sampling, self.max_refill_rounds = mode, max_refill_rounds
        self.sapo = (sapo_temperature_pos, sapo_temperature_neg)
        self.vespo = (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        modes = losses.ISMode.__args__  # type: ignore[attr-defined]
        if vllm_importance_sampling_mode not in modes:
            raise ModalforgeError(f"objective.vllm_importance_sampling_mode={vllm_importance_sampling_mode!r} is not "
                                  f"one of: {', '.join(modes)}")
        self.is_correction = vllm_importance_sampling_correction
        self.is_mode = vllm_importance_sampling_mode
        self.is_clip = (vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max)

    def _advantages(self, total: torch.Tensor, kl: torch.Tensor | None) -> torch.Tensor:
        g = self.num_generations
        nan = torch.isnan(total)
        if nan.any():  # unscorable completions: the group's mean in the baseline, no advantage of their own
            fill = torch.nanmean(total.view(-1, g), 1).nan_to_num(0.0).repeat_interleave(g)
            total = torch.where(nan, fill, total)
        if self.loss_type == "rloo":
            advantages = losses.rloo_advantages(total - self.beta * kl if kl is not None else total, g)
        else:
            advantages = losses.group_advantages(total, g, self.scale_rewards)[0]
        return advantages.masked_fill(nan, 0.0)

    def _flat(self, total: torch.Tensor) -> torch.Tensor:
        """Per group: are all its rewards equal (no advantage to learn from)?"""
        grouped = total.view(-1, self.num_generations).nan_to_num(0)
        return (grouped == grouped[:, :1]).all(1)

    def _refill(self, batch: dict[str, Any]) -> tuple[Rollout, torch.Tensor, dict[str, float]]:
        """DAPO's dynamic sampling with refill: draw prompt groups from the training stream, in order, keeping the
        ones whose rewards differ, until ``data.batch_size`` of them (the surplus of the last draw is dropped) or
        ``max_refill_rounds`` further draws; then train on what there is. Nothing informative at all: the last
        draw, with zero advantages (as ``drop`` keeps an all-flat rollout)."""
        device, g = batch["input_ids"].device, self.num_generations
        want = self.datamodule.batch_size
        kept: list[Rollout] = []
        totals: list[torch.Tensor] = []
        draws: list[dict[str, float]] = []
        generated = flat_groups = have = 0
        for draw in range(1 + self.max_refill_rounds):
            rollout, total, _, metrics = self._sample(self._next_prompts(device), draw=draw)
            draws.append(metrics)
            flat = self._flat(total)
            generated, flat_groups = generated + len(flat), flat_groups + int(flat.sum())
            keep = (~flat).repeat_interleave(g).nonzero().squeeze(1)
            if len(keep):
                kept.append(rollout.select(keep.to(device)))
                totals.append(total[keep])
            have += int((~flat).sum())
            if _everywhere(have >= want, device):  # every rank the same number of draws (collectives in generate)
                break
        if kept:
            rollout = Rollout.cat(kept, self.datamodule.processor.pad_token_id)
            rollout = rollout.select(torch.arange(min(have, want) * g, device=device))
            total = torch.cat(totals)[:min(have, want) * g]
        if have < want:
            log.info("dynamic_sampling=refill: %d of %d informative groups after %d draws (max_refill_rounds=%d); "
                     "training on those", have, want, len(draws), self.max_refill_rounds)
        metrics = {k: (sum if k.startswith("time/") else max if k.endswith("max_length") else
                       lambda v: sum(v) / len(v))([d[k] for d in draws]) for k in draws[0]}
        metrics.update({"frac_reward_zero_std": flat_groups / generated,
                        "dynamic_sampling/dropped_groups": flat_groups / generated,
                        "dynamic_sampling/groups_generated": float(generated),
                        "dynamic_sampling/refill_rounds": float(len(draws) - 1),
                        "dynamic_sampling/filled": min(have, want) / want})
        return rollout, total, metrics

    def _new_rollout(self, batch: dict[str, Any]) -> Rollout:
        device = batch["input_ids"].device
        if self.dynamic_sampling == "refill":  # the loader's batch only ticks: prompts come from _next_prompts
            rollout, total, metrics = self._refill(batch)
            flat = self._flat(total)
        else:
            rollout, total, _, metrics = self._sample(batch)  # metrics of the whole rollout, before dropping groups
            flat = self._flat(total)
            metrics["frac_reward_zero_std"] = float(flat.float().mean())
        attention = rollout.attention_mask
        if self.beta != 0:
            rollout.ref_logps = self._frozen_logps(rollout, reference=True)
        correct = self.is_correction and rollout.sampling_logps is not None and self.loss_type not in losses.ONLINE_DPO
        needs_old = self.steps_per_rollout > 1 or (self.loss_type == "rloo" and self.beta != 0) or correct
        if needs_old:
            rollout.old_logps = self._frozen_logps(rollout, reference=False)
        if correct:  # as TRL with vLLM: pi_old (this policy's log-probs) over the sampler's, truncated or masked
            mask = rollout.completion_mask
            rollout.is_ratio = losses.sampling_importance_ratio(rollout.old_logps, rollout.sampling_logps, mask,
                                                                self.is_mode, *self.is_clip)
            valid = mask.bool() & ~torch.isnan(rollout.sampling_logps)
            delta = (rollout.old_logps - rollout.sampling_logps).abs()[valid]
            flat = rollout.is_ratio.flatten() if self.is_mode.startswith("sequence") else rollout.is_ratio[mask.bool()]
            metrics["sampling/sampling_logp_difference/mean"] = float(delta.mean()) if delta.numel() else 0.0
            metrics["sampling/sampling_logp_difference/max"] = float(delta.max()) if delta.numel() else 0.0
            for stat in ("min", "mean", "max"):
                metrics[f"sampling/importance_sampling_ratio/{stat}"] = float(getattr(flat, stat)()) if flat.numel() \
                    else 0.0
        kl = None
        if self.loss_type == "rloo" and self.beta != 0:  # RLOO: k1 KL of the sequence, as a reward penalty
            kl = ((rollout.old_logps - rollout.ref_logps) * attention).sum(1).cpu()
        rollout.advantages = self._advantages(total, kl).to(device)
        metrics["advantages/mean"] = float(rollout.advantages.mean())
        metrics["advantages/std"] = float(rollout.advantages.std())
        metrics["advantages/abs_mean"] = float(rollout.advantages.abs().mean())
        if self.dynamic_sampling == "drop":
            dropped = flat.float().mean()
            metrics["dynamic_sampling/dropped_groups"] = float(dropped)
            if 0 < dropped < 1:
                keep = (~flat).repeat_interleave(self.num_generations).to(device)
                rollout = rollout.select(keep.nonzero().squeeze(1))
        # dapo/cispo/vespo: the completion tokens of every rank's batch (per rank share), as trl normalises
        rollout.num_items = losses.per_rank_share(rollout.completion_mask.sum()) / self.steps_per_generation
        if self.steps_per_rollout == 1 and not correct:
            rollout.old_logps = None  # on-policy: the ratio is 1, computed from the current forward
        self._rollout_metrics = metrics
        return rollout

    def _loss(self, part: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one minibatch of the rollout, and its statistics."""
        if self.loss_type in losses.ONLINE_DPO:
            # the pair's better completion by reward is the chosen one: the group advantage keeps that order
            logps, _ = self._logps(self.model, part)
            return losses.online_dpo_loss(self.loss_type, logps, part.ref_logps, part.completion_mask,
                                          part.advantages, self.beta)
        logps, entropies = self._logps(self.model, part, entropy=True)
        return losses.grpo_loss(
            self.loss_type, logps, part.old_logps, part.advantages, part.completion_mask, ref_logps=part.ref_logps,
            beta=self.beta, entropies=entropies, entropy_coef=self.entropy_coef, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, delta=self.delta, level=self.level,
            max_completion_length=self.max_completion_length, num_items=self._rollout.num_items,
            sapo_temperature_pos=self.sapo[0], sapo_temperature_neg=self.sapo[1], vespo=self.vespo,
            is_ratio=part.is_ratio)


def _everywhere(flag: bool, device: torch.device) -> bool:
    """``flag`` on every rank (itself when not distributed): ranks stop refilling together."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())
