"""Every plugin trains, checkpoints, resumes and exports under 2-process FSDP2 on CPU (gloo), as the
conformance suite checks it.

sft gets the whole check (every step's loss equal to one process with the same global batch,
exact resume, 2 -> 1 resume); dpo the same in two steps (its frozen reference is rebuilt, not
checkpointed). Every other plugin trains two sharded steps and validates once with a sample,
trainable parameters moving and frozen ones not; those without per-rank randomness (reward_model,
whisper_asr, vlm) also equal one process step by step, and under DDP too, as do causal_lm, and clip
and image_classification with their augmentation off (each rank draws its own crops and flips) and,
for image_classification, a model without BatchNorm (per-rank statistics). diffusion's noise,
wav2vec2's masks, grpo's and ppo's sampling differ by rank, as they must, which makes equality with
one process meaningless for them; the plugins whose state is more than
weights and optimizer (diffusion's EMA shadows, grpo's rollout buffer) are also stopped after one
step and resumed, and must end on the same weights. Every FSDP2 run exports ``final/``, whose
tensors must be the gathered checkpoint's, bit for bit.
"""

from __future__ import annotations

import pytest

from modalforge.testing import assert_plugin_conforms_sharded

#: plugin -> (overrides, data.batch_size per rank or None for the plugin's own)
SHARDED_ONLY = {
    "causal_lm": ((), 2),
    "reward_model": ((), 2),
    # two minibatches per rollout: the step-1 checkpoint holds a rollout half used, which the resume must replay
    "grpo": (("objective.steps_per_generation=2",), 2),
    "ppo": ((), 2),
    "image_classification": ((), 2),
    "clip": ((), 2),
    "diffusion": ((), 2),
    "whisper_asr": ((), 2),
    "wav2vec2": ((), 2),
    "vlm": ((), 2),
    "audio_lm": ((), 2),
    "multitask": (("tasks=[causal_lm,sft]", "objective.mix=sum"), None),
}

#: No per-rank randomness in their defaults: every step's loss equals one process with the global batch.
EQUAL_TO_ONE_PROCESS = {"reward_model", "whisper_asr", "vlm", "audio_lm"}

#: plugin -> overrides that take its per-rank randomness (augmentation) and per-rank statistics (BatchNorm)
#: away, for the equality with one process under DDP (and FSDP2 for those whose default cannot equal).
DETERMINISTIC = {
    "causal_lm": (),
    "reward_model": (),
    "whisper_asr": (),
    "vlm": (),
    "clip": ("data.augment=none",),
    "image_classification": ("data.augment=none", "model=image_classification/vit_custom"),
}

#: Stopped after one of the two steps and resumed too: state beyond weights and optimizer.
RESUMED = {"diffusion", "grpo"}

#: Exports that write the trained weights from elsewhere than the parameters (``export_trained_from``):
#: diffusion's final/ holds the EMA weights (``_ema_applied`` around ``save_pretrained``), so each
#: exported trained tensor must be bit for bit one of the EMA shadows the checkpoint holds, not the
#: raw parameter of its name. Every other export writes the parameters as they are.
EXPORT_TRAINED_FROM = {"diffusion": r"objective\.ema\.shadow_\d+"}


def test_every_installed_built_in_plugin_is_in_the_sharded_checks():
    from modalforge import registry

    built_in = {name for name, item in registry.discover().items() if item.distribution == "modalforge"}
    assert built_in == set(SHARDED_ONLY) | {"sft", "dpo"}


@pytest.mark.slow
def test_sft_under_fsdp2_equals_one_process_and_resumes_exactly(tmp_path):
    report = assert_plugin_conforms_sharded("sft", tmp_path, steps=4, export=True)
    assert report.resume_difference == 0.0 or report.resume_difference <= 1e-6


@pytest.mark.slow
def test_dpo_under_fsdp2_equals_one_process_and_resumes_exactly(tmp_path):
    """dpo's frozen reference policy is sharded too and rebuilt, not checkpointed: the resume rebuilds it."""
    assert_plugin_conforms_sharded("dpo", tmp_path, steps=2, resume=True, export=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_plugins_without_per_rank_randomness_under_ddp_equal_one_process(name, tmp_path):
    assert_plugin_conforms_sharded(name, tmp_path, DETERMINISTIC[name], strategy="ddp", steps=2, resume=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip", "image_classification"])
def test_augmented_plugins_under_fsdp2_equal_one_process_with_augmentation_off(name, tmp_path):
    assert_plugin_conforms_sharded(name, tmp_path, DETERMINISTIC[name], steps=2, resume=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHARDED_ONLY))
def test_every_plugin_trains_under_fsdp2_on_two_processes(name, tmp_path):
    """Two sharded steps, then one validation with a sample (no rank may wait alone at a collective) and
    the export; diffusion and grpo also stop after one step and resume."""
    overrides, batch_size = SHARDED_ONLY[name]
    report = assert_plugin_conforms_sharded(name, tmp_path, overrides, steps=2, batch_size=batch_size,
                                   equal_to_single=name in EQUAL_TO_ONE_PROCESS, resume=name in RESUMED, samples=True, export=True,
                                   export_trained_from=EXPORT_TRAINED_FROM.get(name))
    if name == "image_classification":  # resnet18: per-rank BatchNorm statistics are said, with the choices
        assert "20 BatchNorm layer(s) normalise with each rank's own batch statistics" in report.output
