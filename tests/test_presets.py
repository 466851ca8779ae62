"""Model presets (``model=preset/<family>``, issue 22): each composes into the plugin's causal-LM node and trains.

The hub checkpoints are unreachable here, so each family is a tiny random model of the same
architecture (``model.name_or_path=null`` plus a shrunk ``model.config`` of the family's
``model_type``) and a tiny local BPE carrying the family's published chat template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from modalforge.config import compose
from modalforge.run import run
from modalforge.scale.conformance import QUICK_OVERRIDES

from cli_helpers import series
from test_chat_templates import CHAT, FAMILIES, through_sft

CONF = Path(__file__).resolve().parents[1] / "conf" / "model" / "preset"
# preset: (model_type, template in tests/chat_templates; OLMo 2's Tulu template has zephyr's <|user|>/<|assistant|> shape)
PRESETS = {"llama3": ("llama", "llama3_1"), "qwen2_5": ("qwen2", "qwen2_5"), "qwen3": ("qwen3", "qwen3"),
           "gemma2": ("gemma2", "gemma2"), "gemma3": ("gemma3_text", "gemma3"), "mistral": ("mistral", "mistral_v0_3"),
           "phi3": ("phi3", "phi3_5"), "smollm2": ("llama", "smollm2"), "olmo2": ("olmo2", "zephyr")}
QUICK = [*QUICK_OVERRIDES, "trainer.devices=1", "logger=csv", "callbacks=none", "checkpoint.export_on_end=false",
         "optim.warmup_steps=0", "data.num_workers=0"]


def tiny_config(model_type: str) -> str:
    """A shrunk ``model.config`` override of the family's architecture (vocabulary and ids come from the tokenizer)."""
    settings = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 512}
    return "+model.config={" + ",".join(f"{k}:{v}" for k, v in settings.items()) + "}"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    """One tiny BPE per family template (test_chat_templates' fixture, reused)."""
    from test_chat_templates import tokenizers as build

    return build.__wrapped__(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Small chat, preference and prompt files without a system turn (Gemma 2 and Mistral have no system role)."""
    root = tmp_path_factory.mktemp("preset_data")
    rows = {"sft": [], "dpo": [], "grpo": []}
    for a in range(24):
        b = (a * 7) % 10
        ask = f"What is {a} plus {b}?"
        rows["sft"].append({"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": str(a + b)},
                                         {"role": "user", "content": "And doubled?"},
                                         {"role": "assistant", "content": str(2 * (a + b))}]})
        rows["dpo"].append({"prompt": ask, "chosen": str(a + b), "rejected": str(a + b + 1)})
        rows["grpo"].append({"prompt": ask, "answer": str(a + b)})
    out = {}
    for name, items in rows.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    return out


def overrides(plugin: str, preset: str, tokenizer: Path, data: Path, *extra: str) -> list[str]:
    model_type, _ = PRESETS[preset]
    return [f"plugin={plugin}", f"data.train={data}", f"data.val={data}", "data.chat_template=tokenizer", f"model=preset/{preset}", "model.name_or_path=null", "model.dtype=float32",
            tiny_config(model_type), f"data.tokenizer={tokenizer}", *QUICK, *extra]


def test_every_preset_file_is_tested():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("plugin", ["sft", "dpo", "grpo", "ppo", "causal_lm"])
def test_preset_keeps_the_plugin_node_and_sets_the_family(plugin):
    cfg = compose([f"plugin={plugin}", "model=preset/qwen2_5", "adapter=lora"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert model == {"_target_": "modalforge.text.models.build_causal_lm", "trust_remote_code": False,
                     "name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert list(cfg.adapter.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]
    assert cfg.data.tokenizer == "Qwen/Qwen2.5-0.5B-Instruct"   # the data follows model.name_or_path
    assert compose([f"plugin={plugin}", "model=preset/phi3", "adapter=full"]).adapter == {
        "_target_": "modalforge.adapters.FullAdapter"}   # no LoRA keys on an adapter that has none


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_lora_targets_exist_in_the_family_architecture(preset):
    """PEFT refuses targets a model lacks: every preset's names are linear layers of its family."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = compose(["plugin=sft", f"model=preset/{preset}", "adapter=lora"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        PRESETS[preset][0], hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(cfg.adapter.target_modules) == linear - {"lm_head"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sft_trains_and_tokenises_as_the_template(preset, tokenizers, data, tmp_path):
    template = tokenizers[PRESETS[preset][1]]
    # the ids of a multi-turn chat are apply_chat_template's
    (example,), tokenizer = through_sft(template, [{"messages": CHAT}], tmp_path)
    expected = tokenizer.apply_chat_template(CHAT, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected   # a BatchEncoding in transformers 5
    assert example.input_ids == list(expected)
    run(compose(overrides("sft", preset, template, data["sft"], "trainer.max_steps=5", "optim.lr=1e-2", "data.batch_size=4",
                          "data.packing=false")), tmp_path / "run")
    loss = series(tmp_path / "run", "train/loss")
    assert all(math.isfinite(v) for v in loss.values()) and loss[max(loss)] < loss[min(loss)], loss


@pytest.mark.parametrize("preset", ["llama3", "qwen3", "gemma2"])
def test_dpo_and_grpo_take_the_preset(preset, tokenizers, data, tmp_path):
    template = tokenizers[PRESETS[preset][1]]
    run(compose(overrides("dpo", preset, template, data["dpo"], "trainer.max_steps=2", "data.batch_size=4")), tmp_path / "dpo")
    assert all(math.isfinite(v) for v in series(tmp_path / "dpo", "train/loss").values())
    run(compose(overrides("grpo", preset, template, data["grpo"], "trainer.max_steps=2", "data.batch_size=2",
                          "objective.num_generations=2", "objective.rewards=[digits]")), tmp_path / "grpo")
    assert all(math.isfinite(v) for v in series(tmp_path / "grpo", "train/loss").values())


def test_reward_model_takes_a_preset_with_its_score_head(tokenizers, data, tmp_path):
    """A preset names the causal-LM builder; reward_model builds the same model with a scalar score head."""
    template = tokenizers[PRESETS["qwen2_5"][1]]
    trainer, module, _ = run(compose(overrides("reward_model", "qwen2_5", template, data["dpo"], "trainer.max_steps=2",
                                               "data.batch_size=4")), tmp_path)
    assert type(module.objective.model).__name__ == "Qwen2ForSequenceClassification"
    assert all(math.isfinite(v) for v in series(tmp_path, "train/loss").values())


def test_a_preset_at_the_plugins_demo_learning_rate_is_warned_about():
    from modalforge.cli import preset_lr_warning

    args = ["plugin=sft", "model=preset/qwen2_5"]
    warning = preset_lr_warning(compose(args), args)
    assert warning is not None and "Qwen/Qwen2.5-0.5B-Instruct" in warning and "set optim.lr" in warning
    assert preset_lr_warning(compose([*args, "optim.lr=2e-4"]), [*args, "optim.lr=2e-4"]) is None
    tiny = [*args, "model.name_or_path=null"]
    assert preset_lr_warning(compose(tiny), tiny) is None  # a twin from config: the demo's rate is the right one
    assert preset_lr_warning(compose(["plugin=sft"]), ["plugin=sft"]) is None
