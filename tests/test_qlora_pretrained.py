"""QLoRA as people use it: a saved model loads straight in 4 bits, compute dtype follows precision, FSDP2 shards it."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from modalforge.adapters import QLoraAdapter, check_fsdp_quant_storage, compute_dtype_for, quantize_linears
from modalforge.errors import ConfigError
from modalforge.testing import FAST_OVERRIDES, compose_plugin, run_steps

from tiny_models import save_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def load_spy(monkeypatch):
    """Records what ``AutoModelForCausalLM.from_pretrained`` received and what it returned, and fails
    if the in-memory quantisation (full-precision model first) runs."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    import modalforge.adapters.qlora as qlora

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        linears = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        calls.append({"kwargs": kwargs, "linears": linears,
                      "four_bit": [n for n, t in linears.items() if issubclass(t, bnb.nn.Linear4bit)]})
        return model

    def no_quantize(*args, **kwargs):
        raise AssertionError("the pretrained base was quantised after a full-precision load")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(qlora, "quantize_linears", no_quantize)
    return calls


@pytest.mark.parametrize("plugin", ["causal_lm", "sft"])
def test_pretrained_base_loads_straight_in_4_bits_and_trains(tmp_path, load_spy, plugin):
    import bitsandbytes as bnb

    save_tiny_llama(tmp_path / "base")
    cfg = compose_plugin(plugin, [*FAST_OVERRIDES, "trainer.max_steps=3", "adapter=qlora", f"model={plugin}/pretrained",
                                  f"model.name_or_path={tmp_path / 'base'}", "optim.lr=1e-2"])
    trainer, module, report = run_steps(cfg, tmp_path / "run", 3)

    assert len(load_spy) == 1
    qc = load_spy[0]["kwargs"].get("quantization_config")
    assert qc is not None and qc.load_in_4bit and qc.bnb_4bit_quant_type == "nf4"
    assert qc.bnb_4bit_compute_dtype == torch.float32  # trainer.precision 32-true
    linears = load_spy[0]["linears"]
    expected = {n for n in linears if not n.endswith("lm_head")}
    assert len(expected) == 2 * 7 and set(load_spy[0]["four_bit"]) == expected  # right after from_pretrained
    model = module.objective.model
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert m.weight.dtype == torch.uint8 and m.weight.quant_state is not None
    assert all(math.isfinite(loss) for loss in report.losses) and len(report.losses) == 3
    assert report.changed and all("lora_" in n for n in report.changed)
    assert not report.frozen_changed


def test_compute_dtype_follows_trainer_precision(tmp_path, load_spy):
    """Through the real run: trainer.precision=bf16-mixed gives a bfloat16 compute dtype at from_pretrained."""
    from modalforge.run import run

    save_tiny_llama(tmp_path / "base", layers=1)
    cfg = compose_plugin("causal_lm", [*FAST_OVERRIDES, "trainer.max_steps=2", "adapter=qlora",
                                       "model=causal_lm/pretrained", f"model.name_or_path={tmp_path / 'base'}",
                                       "trainer.precision=bf16-mixed", "checkpoint.export_on_end=false",
                                       "callbacks=none", f"run_dir={tmp_path / 'run'}"])
    run(cfg, tmp_path / "run")
    assert load_spy and load_spy[0]["kwargs"]["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", "bfloat16"), ("bf16-true", "bfloat16"),
                                              ("16-mixed", "float16"), ("32-true", "float32"), (None, "float32"),
                                              ("64-true", "float32")])
def test_compute_dtype_for(precision, dtype):
    assert compute_dtype_for(precision) == dtype
    assert QLoraAdapter().load_kwargs(precision)["quantization_config"].bnb_4bit_compute_dtype == getattr(torch, dtype)
    assert QLoraAdapter(compute_dtype="float32").load_kwargs(precision)[
        "quantization_config"].bnb_4bit_compute_dtype == torch.float32  # a named dtype wins


def test_other_adapters_ask_nothing_of_loading_and_models_from_config_quantise_in_memory():
    from modalforge.adapters import LoraAdapter, adapter_load_kwargs, pretrained_load_kwargs, pretrained_loading
    from modalforge.models import build_model

    assert adapter_load_kwargs(LoraAdapter()) == {} and pretrained_load_kwargs() == {}
    with pretrained_loading(QLoraAdapter()) as kwargs:
        assert "quantization_config" in kwargs and "quantization_config" in pretrained_load_kwargs()
        # a builder without the argument is built as before (and the adapter then quantises in memory)
        model = build_model({"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 4})
    assert pretrained_load_kwargs() == {}
    assert isinstance(model, torch.nn.Linear)


def test_a_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="adapter.quant_storage"):
        QLoraAdapter(quant_storage="nf4")
    with pytest.raises(ConfigError, match="adapter.compute_dtype"):
        QLoraAdapter(compute_dtype="bf16")


def _tiny_quantised(storage: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    quantize_linears(model, quant_storage=storage)
    return model


def test_fsdp_quant_storage_check():
    assert check_fsdp_quant_storage(_tiny_quantised(torch.uint8), torch.bfloat16) == 2  # FSDP2 does not cast uint8
    assert check_fsdp_quant_storage(_tiny_quantised(torch.bfloat16), torch.bfloat16) == 2
    assert check_fsdp_quant_storage(_tiny_quantised(torch.float32), None) == 2
    with pytest.raises(ConfigError, match="adapter.quant_storage: .* stored as float32 .* casts parameters to bfloat16") as err:
        check_fsdp_quant_storage(_tiny_quantised(torch.float32), torch.bfloat16)
    assert "adapter.quant_storage=uint8" in err.value.hint


def test_floating_quant_storage_computes_the_same_layer():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_tiny_quantised(torch.float32)(x), _tiny_quantised(torch.uint8)(x))


def _fsdp2_worker(rank: int, world: int, port: int, folder: str, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for storage in ("uint8", "bfloat16"):
            _fsdp2_case(rank, folder, storage, queue)
    finally:
        dist.destroy_process_group()


def _fsdp2_case(rank: int, folder: str, storage: str, queue) -> None:
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from modalforge.adapters import bnb_quantization_config

    def build():
        qc = bnb_quantization_config("bfloat16", quant_storage=storage)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.bfloat16)
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    reference = build()
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_grads = {n: p.grad.float() for n, p in reference.named_parameters() if p.requires_grad}
    model = build()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert check_fsdp_quant_storage(model, mp.param_dtype) > 0
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.full_tensor().float() for n, p in model.named_parameters() if p.requires_grad}
    diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    queue.put((storage, rank, loss.item(), ref_loss.item(), diff, len(grads)))


@pytest.mark.slow
def test_qlora_base_shards_under_fsdp2_on_cpu(tmp_path):
    """bitsandbytes' 4-bit weights under fully_shard with bf16 mixed precision, 2 CPU processes (gloo):
    the same loss and LoRA gradients as the unsharded model (same batch on both ranks)."""
    import torch.multiprocessing as mp

    save_tiny_llama(tmp_path / "base", layers=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_fsdp2_worker, args=(2, port, str(tmp_path / "base"), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get(timeout=60) for _ in range(4))
    assert [r[:2] for r in results] == [("bfloat16", 0), ("bfloat16", 1), ("uint8", 0), ("uint8", 1)]
    for _, _, loss, ref_loss, diff, count in results:
        assert count > 0 and math.isfinite(loss)
        assert abs(loss - ref_loss) < 1e-2  # bf16 parameters under the policy vs. fp32 LoRA weights unsharded
        assert diff < 5e-2


def test_merging_a_qlora_adapter_dequantises_the_base_and_keeps_the_outputs():
    """merge = dequantise the 4-bit base, then add the LoRA delta: the merged float model computes what
    the QLoRA model computed (before, the delta was added to the packed bytes and the export crashed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    adapter = QLoraAdapter(r=4, target_modules=["q_proj", "v_proj"])
    peft_model = adapter.apply(model)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a delta that moves the outputs
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        merged = adapter.merge(peft_model)
        after = merged(input_ids=ids).logits
    import bitsandbytes as bnb

    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules() if m is not None) or True
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(before, after, atol=1e-4), float((before - after).abs().max())
