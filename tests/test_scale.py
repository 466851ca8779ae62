"""Strategy and precision wiring (the real 2-process DDP run is in test_cli.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from modalforge.config import compose, conf_root
from modalforge.errors import ModalforgeError
from modalforge.plugins.text.causal_lm.objective import CausalLMObjective
from modalforge.scale import build_strategy, check_precision, default_precision


def _strategy_cfg(name: str, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(conf_root() / "strategy" / f"{name}.yaml"))
    return {**cfg, **overrides}


def test_auto_and_ddp():
    assert build_strategy(_strategy_cfg("auto")) == "auto"
    assert build_strategy(None) == "auto"
    ddp = build_strategy(_strategy_cfg("ddp"))
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs.get("find_unused_parameters") is False


def test_causal_lm_names_its_transformer_blocks():
    cfg = compose(["plugin=causal_lm"])
    objective = CausalLMObjective(model=OmegaConf.to_container(cfg.model))
    assert objective.block_classes() == {LlamaDecoderLayer}


@pytest.fixture
def gpu_machine(monkeypatch):
    """FSDP/DeepSpeed are built for GPUs; pretend to have one to check the wiring on this CPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_fsdp_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModalforgeError, match="needs CUDA GPUs.*strategy=fsdp"):
        build_strategy(_strategy_cfg("fsdp1"), accelerator="cpu")


def test_fsdp_wraps_and_checkpoints_the_plugin_blocks(gpu_machine):
    strategy = build_strategy(_strategy_cfg("fsdp1", activation_checkpointing=True, sharding_strategy="SHARD_GRAD_OP"),
                              block_classes={LlamaDecoderLayer})
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    assert strategy.kwargs["use_orig_params"] is True


def test_fsdp_without_blocks_warns(gpu_machine):
    with pytest.warns(UserWarning, match="block_classes"):
        strategy = build_strategy(_strategy_cfg("fsdp1"))
    assert strategy._activation_checkpointing_kwargs == {}


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_is_lightnings_strategy_or_a_clear_install_hint(name, gpu_machine):
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(ModalforgeError, match=r'pip install "modalforge\[deepspeed\]"'):
            build_strategy(_strategy_cfg(name))
        return
    strategy = build_strategy(_strategy_cfg(name, offload_optimizer=True))
    assert strategy.config["zero_optimization"]["stage"] == int(name[-1])


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ModalforgeError, match="auto, ddp, fsdp"):
        build_strategy({"name": "horovod"})


def test_precision_follows_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_precision() == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert default_precision() == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert default_precision() == "16-mixed"
    assert default_precision("cpu") == "32-true"


def test_bf16_on_cpu_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="slower than fp32"):
        assert check_precision("bf16-mixed") == "bf16-mixed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_precision(None) == "32-true"
        assert check_precision("32-true", "cpu") == "32-true"


def test_an_unknown_strategy_setting_is_one_error_naming_it():
    """`+strategy.static_graphh=true` used to be silently ignored."""
    from modalforge.errors import ConfigError
    from modalforge.scale.strategies import STRATEGY_KEYS, check_strategy_keys
    from modalforge.validate import validate_config

    with pytest.raises(ConfigError, match="did you mean 'static_graph'") as info:
        validate_config(compose(["plugin=causal_lm", "strategy=ddp", "+strategy.static_graphh=true"]))
    assert info.value.where == "strategy.static_graphh"
    for name in STRATEGY_KEYS:  # every shipped strategy config passes as it is
        check_strategy_keys(compose(["plugin=causal_lm", f"strategy={name}"]).strategy)
