"""grpo with rollouts sampled elsewhere (``objective.rollout_func``, TRL's name) and TRL's importance-sampling
correction (``vllm_importance_sampling_*``) for the sampler's log-probs: ratios and gradients by hand."""

from __future__ import annotations

import math

import pytest
import torch

from modalforge.config import compose
from modalforge.run import run

from cli_helpers import FAST, series
from tiny_models import built_objective

OFFSET = 0.3  # the "other engine" reports every sampled token OFFSET nats less likely than the policy does
SMOKE = ["model=grpo/tiny_llama", "objective.rewards=[digits]", "data.batch_size=4", "objective.num_generations=4",
         "objective.max_completion_length=4", "objective.beta=0", "optim.warmup_steps=0"]


def other_engine(prompts, objective):
    """Samples with the policy's own ``generate`` and reports its log-probs shifted by ``-OFFSET`` (every other
    completion only when ``objective.alternate`` is set)."""
    ids, mask = objective.rollout_inputs
    out = objective.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                                   num_return_sequences=objective.num_generations,
                                   max_new_tokens=objective.max_completion_length, output_scores=True,
                                   return_dict_in_generate=True, eos_token_id=objective._stop_ids(),
                                   pad_token_id=objective.datamodule.processor.pad_token_id)
    tokens = out.sequences[:, ids.shape[1]:]
    logps = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    completions, logprobs = [], []
    for k, (row, lp) in enumerate(zip(tokens.tolist(), logps.tolist())):
        stop = next((i for i, t in enumerate(row) if t in objective._stop_ids()), len(row) - 1)
        offset = OFFSET * (k % 2) if getattr(objective, "alternate", False) else OFFSET
        completions.append(row[:stop + 1])
        logprobs.append([v - offset for v in lp[:stop + 1]])
    return {"completion_ids": completions, "logprobs": logprobs}


def build(mode: str, clip_max: float | None):
    clip = clip_max if clip_max is not None else "null"
    return built_objective(["plugin=grpo", *SMOKE, f"objective.rollout_func={__file__}:other_engine",
                            f"objective.vllm_importance_sampling_mode={mode}",
                            f"objective.vllm_importance_sampling_clip_max={clip}"])


def grads(objective, batch) -> torch.Tensor:
    objective.model.zero_grad()
    objective.training_step(batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in objective.model.parameters() if p.grad is not None])


def test_token_truncate_scales_the_policy_gradient_by_the_ratio():
    objective, batch = build("token_truncate", 3.0)
    torch.manual_seed(0)
    rollout = objective._new_rollout(batch)
    mask = rollout.completion_mask
    # pi_old / pi_sampler = exp(OFFSET) on every counted token (below the cap of 3)
    torch.testing.assert_close(rollout.is_ratio * mask, math.exp(OFFSET) * mask, atol=1e-4, rtol=1e-4)
    assert objective._rollout_metrics["sampling/sampling_logp_difference/mean"] == pytest.approx(OFFSET, abs=1e-4)
    objective._rollout, objective._position = rollout, 0
    corrected = grads(objective, batch)
    objective._rollout, objective._position = rollout, 0
    objective._rollout.is_ratio = None
    plain = grads(objective, batch)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(corrected, math.exp(OFFSET) * plain, atol=1e-6, rtol=1e-4)


def test_sequence_mask_drops_sequences_beyond_the_cap():
    objective, batch = build("sequence_mask", 2.0)
    objective.alternate = True
    torch.manual_seed(0)
    rollout = objective._new_rollout(batch)
    lengths = rollout.completion_mask.sum(1)
    offsets = OFFSET * (torch.arange(len(lengths)) % 2)
    ratio = torch.exp(offsets * lengths)  # the sequence ratio: the product of the token ratios
    expected = torch.where(ratio > 2.0, torch.zeros_like(ratio), ratio)[:, None]
    assert rollout.is_ratio.shape == (len(lengths), 1)
    torch.testing.assert_close(rollout.is_ratio, expected, atol=1e-4, rtol=1e-4)
    assert (expected == 0).any() and (expected > 0).any(), lengths  # both cases occur


def test_a_run_with_rollout_func_logs_the_correction(tmp_path):
    cfg = compose(["plugin=grpo", *FAST, *SMOKE, f"objective.rollout_func={__file__}:other_engine",
                   "objective.vllm_importance_sampling_mode=token_truncate", "trainer.max_steps=3",
                   "trainer.val_check_interval=null", "trainer.limit_val_batches=0", "callbacks=none",
                   "checkpoint.export_on_end=false", "trainer.enable_progress_bar=false"])
    run(cfg, tmp_path)
    mean = series(tmp_path, "train/sampling/importance_sampling_ratio/mean")
    assert len(mean) == 3 and all(v == pytest.approx(math.exp(OFFSET), rel=1e-3) for v in mean.values())
    assert all(math.isfinite(v) for v in series(tmp_path, "train/loss").values())


def test_rollout_func_with_the_wrong_count_is_one_clear_error():
    from modalforge.errors import ModalforgeError

    objective, batch = build("token_truncate", 3.0)
    objective.rollout_func = lambda prompts, obj: {"completion_ids": [[1, 2]], "logprobs": [[-1.0, -1.0]]}
    with pytest.raises(ModalforgeError, match="returned 1 completion"):
        objective._new_rollout(batch)
