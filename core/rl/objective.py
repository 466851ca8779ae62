"""The loop every online-RL objective shares: sample completions inside the step, score, optimise a buffer.

One rollout = ``data.batch_size`` prompts x ``num_generations`` completions sampled from the
policy (``generate``: KV cache, temperature, top-p/top-k) or from ``rollout_func``, scored by
the rewards (:mod:`modalforge.rl.rewards`), with the reference and old log-probabilities the
loss needs. The rollout is kept in a buffer and optimised for ``steps_per_generation``
minibatches x ``num_iterations`` passes, one minibatch per training step, so Lightning's
automatic optimisation stays; the data module yields each prompt batch that many times in a
row. The buffer and its position are the objective's extra state, so a checkpoint holds them
and a resumed run continues with the next minibatch; each rollout's sampling is seeded by
(seed, rollout number), so the rollouts after a resume are the same too.

A paradigm subclasses :class:`RolloutObjective` and writes only its way from rewards to
advantages (``_new_rollout``) and its loss (``_loss``): grpo's group-relative family, ppo's
critic and GAE.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from modalforge.adapters.stages import continues_adapter
from modalforge.errors import ModalforgeError
from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.losses import token_logprobs
from modalforge.rl.rewards import RewardModel, combine, load_rewards, score
from modalforge.rl.rollout import Rollout
from modalforge.text.models import block_classes_for
from modalforge.text.stops import set_generation_stops, stop_token_ids

log = logging.getLogger(__name__)

ReferenceMode = Literal["auto", "copy", "adapter", "none"]
#: the core's episode options, which every RolloutObjective subclass accepts (``__init_subclass__``)
EPISODE_OPTIONS = ("environment", "max_turns", "max_episode_tokens")


class RolloutObjective(ModelObjective):
    """Sampling, rewards, reference policy and the checkpointed rollout buffer of online RL.

    Args:
        model: the ``model`` config (any ``build_causal_lm`` config, or the cached arithmetic policy).
        rewards: reward specs: built-ins (``exact_match``, ``format``, ``length``, ``digits``, ``overlong``,
            ``math_verify``), ``pkg.module:fn``,
            ``path/file.py:fn``, ``reward_model:/path``; or mappings ``{reward, weight, name, **kwargs}``.
        reward_weights: one weight per reward (TRL's name); default 1 each.
        num_generations: completions per prompt.
        beta: weight of the KL penalty to the reference (0: no reference is built or run).
        reference: ``auto`` (adapter-disabled under PEFT, else a frozen copy; none when beta=0), ``copy``,
            ``adapter``, ``none``.
        num_iterations: passes over each rollout; old log-probs are kept for the ratio.
        steps_per_generation: minibatches (optimiser steps) per pass; must divide batch x num_generations.
        mask_truncated_completions: completions without a stop token do not count in the loss.
        max_completion_length / temperature / top_p / top_k: sampling (``top_k=0``: off).
        generation_batch_size: completions per ``generate`` call (memory); a multiple of num_generations.
        seed: seeds each rollout's sampling with (seed, rollout number).
        rollout_func: ``pkg.module:fn`` or ``file.py:fn`` sampling the training rollouts instead of the policy's
            ``generate`` (TRL's ``rollout_func``): ``fn(prompts, objective) -> {"completion_ids": [[int]],
            "logprobs": [[float]] | None}``, ``num_generations`` completions per prompt in order; the prompts'
            tokens are ``objective.rollout_inputs`` (left-padded ids and mask). ``logprobs`` are the sampler's.
        environment: multi-turn episodes (:mod:`modalforge.rl.episodes`): a built-in (``calculator``, ``python``,
            ``guess_number``), ``pkg.module:factory`` or ``file.py:factory`` making a
            :class:`~modalforge.rl.environment.Environment` per episode, or ``{environment: <spec>, **kwargs}``.
            Every subclass accepts it (and the two below) without naming them: see ``__init_subclass__``.
        max_turns: assistant turns per episode at most (``None``: the environment's ``max_turns``).
        max_episode_tokens: tokens of an episode after its prompt at most, the environment's included
            (``None``: ``max_turns`` (or 4) x (``max_completion_length`` + 32), at most the context left after
            ``data.max_prompt_length``); ``max_completion_length`` caps each turn.
    """

    #: completions per prompt a paradigm needs at least (a group-relative baseline needs two)
    min_generations = 1
    #: weight of an entropy bonus in the loss; 0: the entropy is a metric, computed outside the graph
    entropy_coef = 0.0

    def __init__(self, model: Mapping[str, Any] | None = None, rewards: list[Any] | None = None,
                 reward_weights: list[float] | None = None, num_generations: int = 1, beta: float = 0.0,
                 reference: ReferenceMode = "auto", num_iterations: int = 1, steps_per_generation: int = 1,
                 mask_truncated_completions: bool = False, max_completion_length: int = 8,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 generation_batch_size: int | None = None, seed: int = 0, rollout_func: str | None = None,
                 environment: Any = None, max_turns: int | None = None,
                 max_episode_tokens: int | None = None) -> None:
        super().__init__(model)
        if reference not in ("auto", "copy", "adapter", "none"):
            raise ModalforgeError(f"objective.reference={reference!r} is not one of: auto, copy, adapter, none")
        if num_generations < self.min_generations:
            raise ModalforgeError(f"objective.num_generations={num_generations}: a group needs at least "
                                  f"{self.min_generations} completions")
        if reference == "none" and beta != 0:
            raise ModalforgeError(f"objective.reference=none needs objective.beta=0 (got {beta}): the KL penalty "
                                  "needs a reference")
        if generation_batch_size is not None and generation_batch_size % num_generations:
            raise ModalforgeError(f"objective.generation_batch_size={generation_batch_size} is not a multiple of "
                                  f"objective.num_generations={num_generations}: a group is generated in one call")
        if min(num_iterations, steps_per_generation, max_completion_length) < 1:
            raise ModalforgeError("objective.num_iterations, steps_per_generation and max_completion_length must be >= 1")
        self.num_generations, self.beta, self.reference_mode = num_generations, beta, reference
        self.num_iterations, self.steps_per_generation = num_iterations, steps_per_generation
        self.mask_truncated = mask_truncated_completions
        self.max_completion_length, self.temperature, self.top_p, self.top_k = max_completion_length, temperature, \
            top_p, top_k
        self.generation_batch_size = generation_batch_size
        self.seed = seed
        self.rollout_func = load_rollout_func(rollout_func) if rollout_func else None
        self.rollout_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rewards = load_rewards(rewards or ["exact_match"], reward_weights,
                                    max_completion_length=max_completion_length)
        self.reward_models = nn.ModuleList([r.fn for r in self.rewards if isinstance(r.fn, nn.Module)])
        self.reference: nn.Module | None = None
        self._reference_ready = False
        # the buffer: the rollout being optimised, which step of it comes next, how many rollouts so far
        self._rollout: Rollout | None = None
        self._rollout_metrics: dict[str, float] = {}
        self._position = 0
        self._rollouts = 0
        # where _next_prompts reads the training stream: (epoch, offset), checkpointed; the epoch's order cached
        self._prompt_cursor = (0, 0)
        self._prompt_order: tuple[int, list[int]] | None = None
        self._update_started: float | None = None
        self._last_update_time: float | None = None
        self.set_environment(environment, max_turns, max_episode_tokens)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A paradigm's ``__init__`` accepts ``environment``, ``max_turns`` and ``max_episode_tokens`` without
        listing them: they are the core's episode options, set after the paradigm's own ``__init__``."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or "environment" in inspect.signature(init).parameters:
            return

        @functools.wraps(init)
        def __init__(self: RolloutObjective, *args: Any, environment: Any = None, max_turns: int | None = None,
                     max_episode_tokens: int | None = None, **options: Any) -> None:
            init(self, *args, **options)
            self.set_environment(environment, max_turns, max_episode_tokens)

        # the signature the config checks bind to (and help shows): the paradigm's, plus the episode options
        signature = inspect.signature(init)
        own = inspect.signature(RolloutObjective.__init__).parameters
        extra = [own[name].replace(kind=inspect.Parameter.KEYWORD_ONLY) for name in EPISODE_OPTIONS]
        params = list(signature.parameters.values())
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        __init__.__signature__ = signature.replace(parameters=params[:at] + extra + params[at:])  # type: ignore
        __init__.__annotations__ = {**getattr(init, "__annotations__", {}),
                                    **{n: RolloutObjective.__init__.__annotations__[n] for n in EPISODE_OPTIONS}}
        cls.__init__ = __init__  # type: ignore[method-assign]

    def set_environment(self, environment: Any, max_turns: int | None = None,
                        max_episode_tokens: int | None = None) -> None:
        """Roll out multi-turn episodes in ``environment`` (a spec, see the class; ``None``: one-turn completions)."""
        from modalforge.rl.environment import load_environment

        if environment is not None and self.rollout_func is not None:
            raise ModalforgeError("objective.environment and objective.rollout_func both sample the rollouts: set one")
        if max_turns is not None and max_turns < 1:
            raise ModalforgeError(f"objective.max_turns={max_turns} must be >= 1")
        self.environment_spec = environment
        self.environment = load_environment(environment) if environment is not None else None
        self.max_turns = max_turns
        self._default_budget = max_episode_tokens is None  # then capped by the model's context (check_budget)
        self.max_episode_tokens = int(max_episode_tokens) if max_episode_tokens is not None else \
            (max_turns or 4) * (self.max_completion_length + 32)

    @property
    def steps_per_rollout(self) -> int:
        return self.num_iterations * self.steps_per_generation

    # ---- building -----------------------------------------------------------------
    def connect(self, datamodule: Any) -> None:
        super().connect(datamodule)
        completions = datamodule.batch_size * self.num_generations
        if completions % self.steps_per_generation:
            raise ModalforgeError(
                f"objective.steps_per_generation={self.steps_per_generation} does not divide a rollout of "
                f"data.batch_size={datamodule.batch_size} prompts x objective.num_generations={self.num_generations} "
                f"= {completions} completions")
        datamodule.repeat = self.steps_per_rollout  # each prompt batch serves every step of its rollout
        for reward in self.reward_models:
            if isinstance(reward, RewardModel):
                reward.check_tokenizer(datamodule.processor)

    def set_adapter_target(self, module: nn.Module) -> None:
        self.model = module
        if self._reference_ready:  # export puts back the merged model: the reference is settled already
            return
        self._reference_ready = True
        self._check_context(module)
        if self.reference_mode == "auto":
            # a continued earlier-stage adapter (adapter.resume): disabled, it is the original base, not the start
            self.reference_mode = "none" if self.beta == 0 else (
                "adapter" if hasattr(module, "disable_adapter") and not continues_adapter(module) else "copy")
        if self.reference_mode == "adapter" and not hasattr(module, "disable_adapter"):
            raise ModalforgeError("objective.reference=adapter needs a PEFT adapter (adapter=lora|qlora|dora|ia3)")
        if self.reference_mode == "copy" and self.reference is None:
            self.reference = copy.deepcopy(module)  # the initial policy, before any step

    def _check_context(self, module: nn.Module) -> None:
        context = getattr(getattr(module, "config", None), "max_position_embeddings", None)
        prompt = getattr(self.datamodule, "max_prompt_length", 0) if self.datamodule is not None else 0
        if self.environment is not None:
            from modalforge.rl.episodes import check_budget

            return check_budget(self, module)
        if context and prompt + self.max_completion_length > context:
            raise ModalforgeError(f"data.max_prompt_length={prompt} + objective.max_completion_length="
                                  f"{self.max_completion_length} exceeds the model's context of {context} tokens")

    def frozen_modules(self) -> list[nn.Module]:
        return ([self.reference] if self.reference is not None else []) + list(self.reward_models)

    def block_classes(self) -> set[type[nn.Module]]:
        return block_classes_for(self.model_config)

    # ---- log-probabilities ----------------------------------------------------------
    def _logps(self, model: nn.Module, r: Rollout, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs (at the sampling temperature) of the completion tokens, and their entropies."""
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        mask = torch.cat([r.prompt_mask, r.attention_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # module.loss_impl: chunked never holds the (N, T, vocab) logits; the entropy stays outside the
        # graph when it is only a metric (no bonus)
        return token_logprobs(model, ids, keep=r.completion_ids.shape[1], impl=self.loss_impl,
                              temperature=self.temperature, entropy=entropy, entropy_grad=bool(self.entropy_coef),
                              attention_mask=mask, position_ids=positions)

    @torch.no_grad()
    def _frozen_logps(self, r: Rollout, reference: bool) -> torch.Tensor:
        chunk = self.generation_batch_size or len(r)
        parts = []
        for index in torch.arange(len(r), device=r.completion_ids.device).split(chunk):
            part = r.select(index)
            if not reference:
                parts.append(self._logps(self.model, part)[0])
            elif self.reference_mode == "copy":
                parts.append(self._logps(self.reference, part)[0])
            else:
                with self.model.disable_adapter():
                    parts.append(self._logps(self.model, part)[0])
        return torch.cat(parts)

    # ---- generation -----------------------------------------------------------------
    def _stop_ids(self) -> list[int]:
        return stop_token_ids(self.datamodule.processor)  # EOS and the template's end-of-turn markers

    def _from_rollout_func(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(completion ids, the sampler's log-probs or None) from ``rollout_func``, padded to a tensor."""
        self.rollout_inputs = (batch["input_ids"], batch["attention_mask"])
        out = self.rollout_func(list(batch["prompts"]), self)
        where = f"objective.rollout_func ({getattr(self.rollout_func, '__name__', self.rollout_func)})"
        if not isinstance(out, Mapping) or "completion_ids" not in out:
            raise ModalforgeError(f"{where} must return a dict with 'completion_ids' (and 'logprobs'), got "
                                  f"{type(out).__name__}")
        ids, logprobs = list(out["completion_ids"]), out.get("logprobs")
        expected = len(batch["prompts"]) * self.num_generations
        if len(ids) != expected or (logprobs is not None and [len(x) for x in logprobs] != [len(x) for x in ids]):
            raise ModalforgeError(f"{where} returned {len(ids)} completion(s) for {len(batch['prompts'])} prompts x "
                                  f"objective.num_generations={self.num_generations} = {expected}, or logprobs that "
                                  "do not match the completions token for token")
        device, pad = batch["input_ids"].device, self.datamodule.processor.pad_token_id
        width = max(1, max(len(x) for x in ids))
        completion = torch.full((expected, width), pad, dtype=torch.long, device=device)
        sampling = torch.zeros((expected, width), device=device) if logprobs is not None else None
        for i, row in enumerate(ids):
            completion[i, :len(row)] = torch.as_tensor(list(row), dtype=torch.long)
            if sampling is not None:
                sampling[i, :len(row)] = torch.as_tensor([math.nan if v is None else float(v) for v in logprobs[i]])
        return completion, sampling

    def _stops(self, completion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask up to and including the first stop token, truncated flags: no stop token)."""
        width = completion.shape[1]
        is_stop = torch.isin(completion, torch.tensor(self._stop_ids(), device=completion.device))
        has_stop = is_stop.any(1)
        first = torch.where(has_stop, is_stop.int().argmax(1), torch.full_like(has_stop, width, dtype=torch.long))
        return (torch.arange(width, device=completion.device)[None] <= first[:, None]).long(), ~has_stop

    @torch.no_grad()
    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int,
                  greedy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(completion ids, their attention mask up to the stop token, truncated flags, prompt ids) for each
        prompt repeated ``copies`` times (consecutively: one group per prompt)."""
        tokenizer, stop = self.datamodule.processor, self._stop_ids()
        was_training = self.model.training
        self.model.eval()
        per_call = max(1, (self.generation_batch_size or len(input_ids) * copies) // copies)
        outs = []
        try:
            for start in range(0, len(input_ids), per_call):
                ids, mask = input_ids[start:start + per_call], attention_mask[start:start + per_call]
                sampling = {"do_sample": False} if greedy else {
                    "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_completion_length,
                                          num_return_sequences=copies, pad_token_id=tokenizer.pad_token_id,
                                          eos_token_id=stop, use_cache=True, **sampling)
                outs.append(out[:, ids.shape[1]:])
        finally:
            self.model.train(was_training)
        width = max(o.shape[1] for o in outs)
        completion = torch.cat([nn.functional.pad(o, (0, width - o.shape[1]), value=tokenizer.pad_token_id)
                                for o in outs])
        attention, truncated = self._stops(completion)
        return completion, attention, truncated, input_ids.repeat_interleave(copies, 0)

    def _score(self, batch: dict[str, Any], completion: torch.Tensor, attention: torch.Tensor,
               copies: int) -> tuple[torch.Tensor, list[str]]:
        tokenizer = self.datamodule.processor
        ids = [row[m.bool()].tolist() for row, m in zip(completion, attention)]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        index = [i // copies for i in range(len(texts))]
        names = sorted({k for f in batch["fields"] for k in f})
        columns = {k: [batch["fields"][i].get(k) for i in index] for k in names}
        columns["completion_ids"] = ids
        per_reward = score(self.rewards, [batch["prompts"][i] for i in index], texts, columns,
                           [batch["where"][i] for i in index])
        return per_reward, texts

    def _next_prompts(self, device: torch.device) -> dict[str, Any]:
        """The next ``data.batch_size`` prompts of the training stream, collated, for a paradigm that samples more
        prompts per rollout than the one batch the loader gives (grpo's ``dynamic_sampling=refill``).

        The order is the train sampler's (seeded per epoch, sharded per rank; an incomplete last block skipped, as
        the loader does), read from a cursor of this objective's checkpointed state: a resumed run draws the same
        prompts, in the same order, whatever the loader's position.
        """
        from modalforge.data.loader import ResumableSampler

        dm = self.datamodule
        size, (epoch, offset) = dm.batch_size, self._prompt_cursor
        for _ in range(2):
            if self._prompt_order is None or self._prompt_order[0] != epoch:
                sampler = ResumableSampler(dm.train_set, shuffle=True, seed=dm.seed)
                sampler.set_epoch(epoch)
                self._prompt_order = (epoch, sampler._indices())
            if offset + size <= len(self._prompt_order[1]):
                break
            epoch, offset = epoch + 1, 0
        items = [dm.train_set[i] for i in self._prompt_order[1][offset:offset + size]]
        self._prompt_cursor = (epoch, offset + size)
        batch = dm.collate(items)
        batch["input_ids"], batch["attention_mask"] = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        return batch

    def _sample(self, batch: dict[str, Any],
                draw: int = 0) -> tuple[Rollout, torch.Tensor, torch.Tensor, dict[str, float]]:
        """Generate and score a rollout: (rollout without advantages, total rewards, truncated flags, metrics).

        ``draw`` > 0: a further sampling of the same rollout (a refill), seeded apart from the first.
        """
        start = time.perf_counter()
        device = batch["input_ids"].device
        sampling_logps = None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + self._rollouts + 1_000_000_007 * draw)
            if self.environment is not None:  # multi-turn episodes: modalforge.rl.episodes
                from modalforge.rl.episodes import sample_episodes

                return sample_episodes(self, batch)
            if self.rollout_func is not None:
                completion, sampling_logps = self._from_rollout_func(batch)
                attention, truncated = self._stops(completion)
                prompt_ids = batch["input_ids"].repeat_interleave(self.num_generations, 0)
            else:
                completion, attention, truncated, prompt_ids = self._generate(
                    batch["input_ids"], batch["attention_mask"], self.num_generations, greedy=False)
        generated = time.perf_counter()
        per_reward, _ = self._score(batch, completion, attention, self.num_generations)
        total = combine(per_reward, self.rewards)
        loss_mask = attention.float()
        if self.mask_truncated:
            loss_mask = loss_mask * (~truncated).float()[:, None]
        rollout = Rollout(prompt_ids, batch["attention_mask"].repeat_interleave(self.num_generations, 0), completion,
                          loss_mask, attention, torch.zeros(len(completion), device=device), None, None, 0.0,
                          sampling_logps=sampling_logps)
        lengths = attention.sum(1).float()
        metrics = {"reward": float(total.nanmean()), "reward_std": float(nanstd(total)),
                   "completions/mean_length": float(lengths.mean()), "completions/max_length": float(lengths.max()),
                   "completions/clipped_ratio": float(truncated.float().mean()),
                   "time/generation": generated - start, "time/scoring": time.perf_counter() - generated}
        for k, reward in enumerate(self.rewards):
            metrics[f"rewards/{reward.name}/mean"] = float(per_reward[:, k].nanmean())
            metrics[f"rewards/{reward.name}/std"] = float(nanstd(per_reward[:, k]))
        return rollout, total, truncated, metrics

    # ---- what a paradigm writes -------------------------------------------------------
    def _new_rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample (``self._sample``) and score a rollout, and give it its advantages (and whatever its loss reads)."""
        raise NotImplementedError

    def _loss(self, part: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one minibatch of the rollout, and its statistics."""
        raise NotImplementedError

    # ---- steps --------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        metrics: dict[str, Any] = {}
        if self._rollout is None or self._position >= self.steps_per_rollout:
            self._rollout = self._new_rollout(batch)
            self._position = 0
            self._rollouts += 1
        else:
            self._rollout = self._rollout.to(batch["input_ids"].device)
        metrics.update(self._rollout_metrics)
        if self._last_update_time is not None:
            metrics["time/update"] = self._last_update_time
        self._update_started = time.perf_counter()
        k = self._position % self.steps_per_generation
        parts = torch.arange(len(self._rollout), device=self._rollout.completion_ids.device).tensor_split(
            self.steps_per_generation)
        part = self._rollout.select(parts[k] if len(parts[k]) else parts[0])
        loss, stats = self._loss(part)
        metrics.update(stats)
        metrics["rollout/step"] = float(self._position)
        self._position += 1
        return StepOutput(loss=loss, metrics=metrics, num_tokens=int(part.completion_mask.sum()),
                          batch_size=len(part))

    def after_optimizer_step(self) -> None:
        if self._update_started is not None:
            self._last_update_time = time.perf_counter() - self._update_started

    @torch.no_grad()
    def _greedy(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
        if self.environment is not None:
            from modalforge.rl.episodes import greedy_episodes

            per_reward, _, texts, _ = greedy_episodes(self, batch)
            return per_reward, texts
        completion, attention, _, _ = self._generate(batch["input_ids"], batch["attention_mask"], 1, greedy=True)
        return self._score(batch, completion, attention, 1)

    def validation_step(self, batch: dict[str, Any]) -> StepOutput:
        extra: dict[str, float] = {}
        if self.environment is not None:  # greedy episodes; the environment's rewards are in the total
            from modalforge.rl.episodes import greedy_episodes

            per_reward, total, _, extra = greedy_episodes(self, batch)
        else:
            per_reward, _ = self._greedy(batch)
            total = combine(per_reward, self.rewards)
        metrics: dict[str, Any] = {"reward": total.nanmean(), **extra}
        for k, reward in enumerate(self.rewards):
            metrics[f"reward/{reward.name}"] = per_reward[:, k].nanmean()
        return StepOutput(loss=None, metrics=metrics, batch_size=len(total))

    def sample(self, inputs: list[dict[str, Any]]) -> list[str]:
        from modalforge.rl.prompts import collate_prompts

        device = next(self.model.parameters()).device
        batch = collate_prompts(inputs, self.datamodule.processor.pad_token_id)
        batch["input_ids"], batch["attention_mask"] = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        per_reward, texts = self._greedy(batch)
        out = []
        for i, text in enumerate(texts):
            scores = ", ".join(f"{r.name}={per_reward[i, k]:.3g}" for k, r in enumerate(self.rewards))
            out.append(f"{inputs[i]['messages'][-1]['content']} -> {text!r} [{scores}]")
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        # final/: plain ``model.generate`` stops at the template's end of turn (generation_config.eos_token_id)
        set_generation_stops(self.adapter_target(), getattr(self.datamodule, "processor", None))
        super().save_pretrained(directory)

    # ---- checkpointed buffer ------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"rollout": self._rollout.state() if self._rollout is not None else None, "position": self._position,
                "rollouts": self._rollouts, "rollout_metrics": dict(self._rollout_metrics),
                "reference_mode": self.reference_mode, "prompt_cursor": list(self._prompt_cursor)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        rollout = state.get("rollout")
        self._rollout = Rollout(**rollout) if rollout is not None else None
        self._position, self._rollouts = int(state.get("position", 0)), int(state.get("rollouts", 0))
        self._rollout_metrics = dict(state.get("rollout_metrics") or {})
        epoch, offset = state.get("prompt_cursor") or (0, 0)
        self._prompt_cursor = (int(epoch), int(offset))


def load_rollout_func(spec: str) -> Any:
    """``objective.rollout_func`` from ``pkg.module:fn`` or ``path/file.py:fn`` (errors as for rewards)."""
    from modalforge.rl.rewards import _import

    return _import(str(spec), "objective.rollout_func")


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Standard deviation over the non-NaN entries (0 for fewer than two): unscorable completions left out."""
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.zeros(())
