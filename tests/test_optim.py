"""Optimizer groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
from torch import nn

from modalforge.optim import build_optimizer, build_scheduler, lr_lambda, parameter_groups


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
