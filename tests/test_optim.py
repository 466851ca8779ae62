"""Optimizer groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.optim import (build_optimizer, build_scheduler, clips_scaled_gradients, implementation_flags,
                              lr_lambda, parameter_groups)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_bias_and_norm_and_frozen_params_excluded():
    model = Tiny()
    groups = parameter_groups(model.named_parameters(), 0.1)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay == {id(model.linear.weight)}
    assert no_decay == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias)}
    assert id(model.frozen.weight) not in decay | no_decay


def test_all_frozen_is_a_clear_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(model.named_parameters(), 0.0)


def test_cosine_schedule_by_hand():
    kw = dict(warmup_steps=10, total_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert lr_lambda(0, **kw) == pytest.approx(0.1)
    assert lr_lambda(9, **kw) == pytest.approx(1.0)
    assert lr_lambda(10, **kw) == pytest.approx(1.0)
    assert lr_lambda(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(110, **kw) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    assert lr_lambda(50, warmup_steps=0, total_steps=100, schedule="linear", min_lr_ratio=0.0) == pytest.approx(0.5)
    assert lr_lambda(99, warmup_steps=0, total_steps=100, schedule="constant", min_lr_ratio=0.0) == 1.0
    with pytest.raises(ValueError, match="cosine, linear, constant"):
        lr_lambda(0, warmup_steps=0, total_steps=10, schedule="wavy", min_lr_ratio=0.0)


def test_scheduler_steps_the_optimizer_lr():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model.named_parameters(), {"name": "adamw", "lr": 1.0, "weight_decay": 0.0})
    sched = build_scheduler(opt, {"scheduler": "linear", "warmup_ratio": 0.5, "min_lr_ratio": 0.0}, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="adamw, sgd, adamw_8bit"):
        build_optimizer(nn.Linear(2, 2).named_parameters(), {"name": "lion", "lr": 1e-3})


def _train(implementation, steps=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 1))
    opt = build_optimizer(model.named_parameters(), {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1,
                                                     "implementation": implementation})
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt, model


def test_fused_adamw_is_the_default_and_updates_as_the_plain_loop():
    fused, fused_model = _train(None)  # optim.implementation unset: auto
    assert all(g["fused"] for g in fused.param_groups)
    for implementation in ("for_loop", "foreach"):
        opt, model = _train(implementation)
        assert not any(g["fused"] for g in opt.param_groups)
        assert all(g["foreach"] == (implementation == "foreach") for g in opt.param_groups)
        for a, b in zip(fused_model.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_implementation_choices_and_errors():
    params = [nn.Parameter(torch.zeros(3))]
    assert implementation_flags(params, "auto") == {"fused": True}
    assert implementation_flags(params, "for_loop") == {"fused": False, "foreach": False}
    # gradient clipping under a GradScaler (16-mixed): Lightning unscales before the step, which fused refuses
    assert implementation_flags(params, "auto", unscale_before_step=True) == {"foreach": False}
    with pytest.raises(ModalforgeError, match="optim.implementation=fused cannot be combined with gradient clipping"):
        implementation_flags(params, "fused", unscale_before_step=True)
    complex_params = [nn.Parameter(torch.zeros(3, dtype=torch.cfloat))]  # no fused kernel for complex
    assert "fused" not in implementation_flags(complex_params, "auto")
    with pytest.raises(ModalforgeError, match=r"optim.implementation=fused: torch has no fused kernel .*complex64"):
        implementation_flags(complex_params, "fused")
    with pytest.raises(ModalforgeError, match=r"optim.implementation='fast' is not one of: auto, fused, foreach"):
        build_optimizer(nn.Linear(2, 2).named_parameters(), {"lr": 1e-3, "implementation": "fast"})
    sgd = build_optimizer(nn.Linear(2, 2).named_parameters(), {"name": "sgd", "lr": 1e-3})
    assert sgd.param_groups[0]["fused"]
    trainer = type("T", (), {"gradient_clip_val": 1.0, "precision": "16-mixed"})()
    # Lightning's MixedPrecision refuses to clip for a fused optimizer under bf16-mixed too (no scaler there)
    assert clips_scaled_gradients(trainer) and clips_scaled_gradients(
        type("T", (), {"gradient_clip_val": 1.0, "precision": "bf16-mixed"})())
    assert not clips_scaled_gradients(type("T", (), {"gradient_clip_val": 1.0, "precision": "32-true"})())


def _adam_steps(name, steps=4):
    torch.manual_seed(0)
    model = nn.Linear(64, 64)  # 4096 weights: bitsandbytes keeps 8-bit state from 4096 elements up
    opt = build_optimizer(model.named_parameters(), {"name": name, "lr": 1e-2, "weight_decay": 0.0,
                                                     "betas": [0.9, 0.999]})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 64, generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, model, losses


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name, cls", [("paged_adamw_8bit", "PagedAdamW8bit"), ("paged_adamw_32bit", "PagedAdamW32bit")])
def test_paged_optimizers_are_bitsandbytes_paged_ones_and_train(name, cls):
    opt, _, losses = _adam_steps(name)
    assert type(opt).__name__ == cls and opt.is_paged
    assert losses[-1] < losses[0]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_paged_adamw_32bit_makes_adamws_update():
    # On a CPU bitsandbytes runs the paged optimizer unpaged: the update is AdamW's, to float rounding.
    _, paged, _ = _adam_steps("paged_adamw_32bit")
    _, plain, _ = _adam_steps("adamw")
    torch.testing.assert_close(paged.weight, plain.weight, atol=1e-5, rtol=1e-4)


def test_lightning_cli_paged_optimizer_names_map_to_the_paged_ones():
    from modalforge.cli.lightning_args import translate_argv

    assert "optim.name=paged_adamw_8bit" in translate_argv(["plugin=sft", "--optimizer=PagedAdamW8bit"])
    assert "optim.name=paged_adamw_32bit" in translate_argv(
        ["plugin=sft", "--optimizer=bitsandbytes.optim.PagedAdamW32bit"])
    assert "optim.name=adamw_8bit" in translate_argv(["plugin=sft", "--optimizer=AdamW8bit"])


def _optim_cfg(**extra):
    from omegaconf import OmegaConf

    from modalforge.config import compose

    cfg = compose(["plugin=causal_lm", *[f"+optim.{k}={v}" for k, v in extra.items()]])
    return cfg, OmegaConf.to_container(cfg.optim, resolve=True)


def test_any_optimizer_by_target_gets_groups_lr_and_only_the_arguments_it_takes():
    """RMSprop takes eps and momentum but not the defaults' betas; +optim.alpha reaches it; the groups keep
    weight decay off the bias and norm, as for the named optimizers."""
    from modalforge.validate import validate_config

    cfg, node = _optim_cfg(_target_="torch.optim.RMSprop", alpha=0.9)
    validate_config(cfg)
    model = Tiny()
    optimizer = build_optimizer(model.named_parameters(), node)
    assert type(optimizer) is torch.optim.RMSprop
    assert optimizer.defaults["alpha"] == 0.9 and optimizer.defaults["lr"] == node["lr"]
    assert optimizer.defaults["momentum"] == node["momentum"] and optimizer.defaults["eps"] == node["eps"]
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, node["weight_decay"]]
    before = model.linear.weight.detach().clone()
    model.linear(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model.linear.weight)


def test_a_wrong_key_for_the_target_optimizer_is_a_config_error_naming_it():
    from modalforge.errors import ConfigError
    from modalforge.validate import validate_config

    cfg, _ = _optim_cfg(_target_="torch.optim.RMSprop", alpah=0.9)
    with pytest.raises(ConfigError, match="unknown key for torch.optim.RMSprop") as err:
        validate_config(cfg)
    assert "alpha" in str(err.value) + str(getattr(err.value, "hint", ""))
    cfg, _ = _optim_cfg(_target_="torch.optim.NoSuchOptimizer")
    with pytest.raises(ConfigError, match="cannot import"):
        validate_config(cfg)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_every_named_optimizer_passes_validation(name):
    """The check once read a list that lacked the paged optimizers, refusing optim.name=paged_adamw_8bit."""
    from modalforge.config import compose
    from modalforge.errors import ConfigError
    from modalforge.validate import validate_config

    validate_config(compose(["plugin=causal_lm", f"optim.name={name}"]))
    with pytest.raises(ConfigError, match="is not one of"):
        validate_config(compose(["plugin=causal_lm", "optim.name=adamw8"]))
