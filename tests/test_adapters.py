"""Adapters on PEFT and bitsandbytes, on a Hugging Face LM and on a plain nn.Module."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from modalforge.adapters import (DoraAdapter, FreezeAdapter, FullAdapter, IA3Adapter, LoraAdapter, QLoraAdapter,
                                 trainable_parameter_summary)
from modalforge.config import conf_root
from modalforge.errors import ModalforgeError


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))


def one_step(model, batch=IDS):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if isinstance(batch, torch.Tensor) and batch.dtype == torch.long:
        loss = model(input_ids=batch, labels=batch).loss
    else:
        loss = model(batch).pow(2).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    return changed


def test_full_trains_everything():
    model = FullAdapter().apply(tiny_llama())
    trainable, total = trainable_parameter_summary(model)
    assert trainable == total


def test_freeze_trains_only_named_modules_and_names_bad_patterns():
    model = FreezeAdapter(trainable=["lm_head"]).apply(tiny_llama())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"lm_head.weight"}
    with pytest.raises(ModalforgeError, match="classifier.*top-level modules"):
        FreezeAdapter(trainable=["classifier"]).apply(tiny_llama())
    probe = FreezeAdapter(trainable=["2"]).apply(mlp())  # the last layer of a Sequential
    assert one_step(probe, torch.randn(3, 8)) == {"2.weight", "2.bias"}


@pytest.mark.parametrize("adapter", [LoraAdapter(r=4), DoraAdapter(r=4), IA3Adapter()], ids=["lora", "dora", "ia3"])
def test_peft_adapters_train_only_adapter_weights(adapter):
    model = adapter.apply(tiny_llama(), "all-linear")
    # LoRA's B starts at zero, so A only moves from the second step; two steps show both moving.
    changed = one_step(model) | one_step(model)
    assert changed and all(("lora_" in n) or ("ia3_" in n) for n in changed), changed
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_lora_on_a_plain_module():
    model = LoraAdapter(r=2).apply(mlp(), ["0", "2"])
    changed = one_step(model, torch.randn(3, 8)) | one_step(model, torch.randn(3, 8))
    assert changed and all("lora_" in n for n in changed)


def test_saved_lora_loads_with_plain_peft_and_merge_loads_with_plain_transformers(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = LoraAdapter(r=4)
    model = adapter.apply(tiny_llama(), "all-linear")
    one_step(model), one_step(model)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    adapter.save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected)
    merged = adapter.merge(model)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-4)


def test_qlora_base_is_really_4bit_and_trains_on_cpu():
    import bitsandbytes as bnb

    model = QLoraAdapter(r=4).apply(tiny_llama(), "all-linear")
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # q, k, v, o, gate, up, down per layer
    for layer in quantised:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state is not None
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if n.endswith("lm_head"))
    changed = one_step(model) | one_step(model)
    assert changed and all("lora_" in n for n in changed)


def test_every_adapter_yaml_instantiates():
    for path in sorted((conf_root() / "adapter").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if path.stem == "freeze":
            cfg.trainable = ["lm_head"]
        adapter = instantiate(cfg)
        assert adapter.apply(tiny_llama(), "all-linear") is not None, path.name
