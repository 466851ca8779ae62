"""Stages that build on each other: an earlier stage's LoRA folder as the next stage's model.name_or_path.

sft(LoRA) on a saved base exports the adapter alone. dpo(LoRA) pointed at it must start from the sft
model (base + adapter), not from the base: merged with a new adapter on top (default; final/ is then a
whole model), or continuing the same adapter (adapter.resume=true; final/ an adapter over the base).
"""

from __future__ import annotations

import json

import pytest
import torch

from cli_helpers import FAST, run_cli
from tiny_models import save_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

STEPS = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1"]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def sft_stage(tmp_path_factory):
    """base/ and an sft run with adapter=lora on it (its final/ is the adapter alone)."""
    root = tmp_path_factory.mktemp("stages")
    save_tiny_llama(root / "base")
    run_cli("train", "plugin=sft", "model=sft/pretrained", f"model.name_or_path={root / 'base'}", "adapter=lora",
            "optim.lr=5e-2", f"run_dir={root / 'sft'}", *STEPS, *FAST)
    return root


def _sft_model(root):
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(root / "sft" / "final")).merge_and_unload()


def _ids(root) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "sft" / "final"))
    return torch.tensor([tokenizer("12 + 7 = 19, and 3 + 4 = 7")["input_ids"]])


def test_an_adapter_folder_loads_as_base_plus_adapter_merged_or_trainable(sft_stage):
    from transformers import AutoModelForCausalLM

    from modalforge.adapters import continues_adapter
    from modalforge.text.models import block_classes_for, build_causal_lm

    final = sft_stage / "sft" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").exists()
    ids = _ids(sft_stage)
    sft, base = _logits(_sft_model(sft_stage), ids), _logits(AutoModelForCausalLM.from_pretrained(
        str(sft_stage / "base")), ids)
    vocab = sft.shape[-1]
    assert (sft[..., :base.shape[-1]] - base).abs().max() > 1e-3  # the sft stage moved the model

    merged = build_causal_lm(str(final), vocab_size=vocab)
    assert not hasattr(merged, "peft_config") and not continues_adapter(merged)
    torch.testing.assert_close(_logits(merged, ids), sft, atol=1e-5, rtol=0)

    continued = build_causal_lm(str(final), vocab_size=vocab, resume_adapter=True)
    assert continues_adapter(continued)
    assert any(p.requires_grad for n, p in continued.named_parameters() if "lora_" in n)
    torch.testing.assert_close(_logits(continued, ids), sft, atol=1e-5, rtol=0)
    assert block_classes_for({"name_or_path": str(final)})  # read from the adapter's base config


def test_sft_lora_then_dpo_lora_starts_from_the_sft_model_and_exports_it_merged(sft_stage, tmp_path):
    from transformers import AutoModelForCausalLM

    run_cli("train", "plugin=dpo", "model=dpo/pretrained", f"model.name_or_path={sft_stage / 'sft' / 'final'}",
            "adapter=lora", "optim.lr=5e-3", f"run_dir={tmp_path / 'dpo'}", *STEPS, *FAST)
    final = tmp_path / "dpo" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()  # whole, merged
    ids = _ids(sft_stage)
    dpo = _logits(AutoModelForCausalLM.from_pretrained(str(final)), ids)
    sft = _logits(_sft_model(sft_stage), ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(str(sft_stage / "base")), ids)
    width = base.shape[-1]  # the base's vocabulary (sft added the chat tokens)
    moved = (dpo - sft)[..., :width].abs().mean().item()
    assert 0 < moved < 0.5 * (dpo[..., :width] - base).abs().mean().item()  # from the sft model, not the base
    assert json.loads((final / "modalforge.json").read_text())["plugin"] == "dpo"


def test_adapter_resume_continues_the_sft_adapter_with_the_sft_model_as_reference(sft_stage, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from modalforge.testing import FAST_OVERRIDES, compose_plugin, run_steps

    source = sft_stage / "sft" / "final"
    cfg = compose_plugin("dpo", [*FAST_OVERRIDES, "model=dpo/pretrained", f"model.name_or_path={source}",
                                 "adapter=lora", "adapter.resume=true", "optim.lr=2e-2"])
    _, module, report = run_steps(cfg, tmp_path / "steps", 3)
    assert module.objective.reference_mode == "copy"  # disabled, the continued adapter would be the base
    assert all(torch.isfinite(torch.tensor(report.losses)))
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)

    run_cli("train", "plugin=dpo", "model=dpo/pretrained", f"model.name_or_path={source}", "adapter=lora",
            "adapter.resume=true", "optim.lr=5e-3", f"run_dir={tmp_path / 'dpo'}", *STEPS, *FAST)
    final = tmp_path / "dpo" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(sft_stage / "base")  # an adapter over the original base
    ids = _ids(sft_stage)
    dpo = _logits(AutoPeftModelForCausalLM.from_pretrained(str(final)), ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(str(sft_stage / "base")), ids)
    width = base.shape[-1]
    moved = (dpo - _logits(_sft_model(sft_stage), ids))[..., :width].abs().mean().item()
    assert 0 < moved < 0.5 * (dpo[..., :width] - base).abs().mean().item()


def test_adapter_resume_without_an_adapter_folder_is_one_clear_error(tmp_path):
    save_tiny_llama(tmp_path / "base")
    proc = run_cli("train", "plugin=sft", "model=sft/pretrained", f"model.name_or_path={tmp_path / 'base'}",
                   "adapter=lora", "adapter.resume=true", f"run_dir={tmp_path / 'run'}", *STEPS, *FAST, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "adapter.resume" in proc.stderr and "Traceback" not in proc.stderr


def test_grpo_continuing_the_sft_adapter_takes_a_copy_as_its_reference(sft_stage, tmp_path):
    from modalforge.testing import FAST_OVERRIDES, compose_plugin, run_steps

    source = sft_stage / "sft" / "final"
    base = ["model=grpo/pretrained", f"model.name_or_path={source}", "adapter=lora", "objective.beta=0.04",
            "data.batch_size=2", "objective.num_generations=2", "objective.max_completion_length=4"]
    for resume, expected in (("true", "copy"), ("false", "adapter")):
        cfg = compose_plugin("grpo", [*FAST_OVERRIDES, *base, f"adapter.resume={resume}"])
        _, module, report = run_steps(cfg, tmp_path / resume, 1)
        assert module.objective.reference_mode == expected  # merged: the new adapter disabled is the sft model
        assert all(torch.isfinite(torch.tensor(report.losses)))
