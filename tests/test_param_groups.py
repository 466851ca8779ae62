"""optim.param_groups: per-module learning rates for every plugin."""

from __future__ import annotations

import pytest
from torch import nn

from modalforge.config import compose
from modalforge.errors import ModalforgeError
from modalforge.optim import build_optimizer, build_scheduler
from modalforge.param_groups import build_param_groups


class Parts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.multi_modal_projector = nn.Linear(4, 4)
        self.language_model = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def _ids(group: dict) -> set[int]:
    return {id(p) for p in group["params"]}


def test_groups_get_their_lr_and_keep_the_no_decay_rule():
    model = Parts()
    groups = build_param_groups(model.named_parameters(),
                                [{"modules": ["vision_tower"], "lr": 1e-5},
                                 {"modules": ["multi_modal_projector"], "lr": 1e-3, "weight_decay": 0.5}], 0.1)
    by_lr = {}
    for group in groups:
        by_lr.setdefault(group.get("lr"), []).append(group)
    # default groups first (no lr key: the optimizer's lr), language_model only
    assert "lr" not in groups[0]
    assert set().union(*(_ids(g) for g in by_lr[None])) == {id(model.language_model.weight),
                                                             id(model.language_model.bias)}
    tower = by_lr[1e-5]
    decay = [g for g in tower if g["weight_decay"] > 0]
    assert _ids(decay[0]) == {id(model.vision_tower[0].weight)} and decay[0]["weight_decay"] == 0.1
    no_decay = [g for g in tower if g["weight_decay"] == 0]
    assert _ids(no_decay[0]) == {id(model.vision_tower[0].bias), id(model.vision_tower[1].weight),
                                 id(model.vision_tower[1].bias)}
    projector = {g["weight_decay"]: _ids(g) for g in by_lr[1e-3]}
    assert projector == {0.5: {id(model.multi_modal_projector.weight)}, 0.0: {id(model.multi_modal_projector.bias)}}
    everything = set().union(*(_ids(g) for g in groups))
    assert id(model.frozen.weight) not in everything
    assert len(everything) == sum(p.requires_grad for p in model.parameters())


def test_matching_is_by_whole_components_or_regex_and_first_entry_wins():
    model = nn.ModuleDict({"tower": nn.Linear(2, 2), "my_tower_x": nn.Linear(2, 2)})
    groups = build_param_groups(model.named_parameters(), [{"modules": ["tower"], "lr": 1.0},
                                                           {"modules": ["re:tower"], "lr": 2.0}], 0.0)
    lrs = {id(p): g.get("lr") for g in groups for p in g["params"]}
    assert lrs[id(model["tower"].weight)] == 1.0
    assert lrs[id(model["my_tower_x"].weight)] == 2.0


def test_a_pattern_matching_nothing_is_named():
    with pytest.raises(ModalforgeError, match=r"optim.param_groups\[1\]: module 'visual' matches no parameter"):
        build_param_groups(Parts().named_parameters(), [{"modules": ["language_model"], "lr": 1e-4},
                                                        {"modules": ["visual"], "lr": 1e-5}], 0.0)
    with pytest.raises(ModalforgeError, match="'frozen' matches only frozen parameters"):
        build_param_groups(Parts().named_parameters(), [{"modules": ["frozen"], "lr": 1e-5}], 0.0)
    with pytest.raises(ModalforgeError, match="'modules' must be a non-empty list"):
        build_param_groups(Parts().named_parameters(), [{"lr": 1e-5}], 0.0)


def test_optimizer_and_schedule_scale_every_group():
    model = Parts()
    cfg = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0,
           "param_groups": [{"modules": ["vision_tower"], "lr": 1e-5}]}
    optimizer = build_optimizer(model.named_parameters(), cfg)
    scheduler = build_scheduler(optimizer, {"scheduler": "linear", "warmup_steps": 0, "min_lr_ratio": 0.0}, 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = sorted(g["lr"] for g in optimizer.param_groups)
    assert lrs[0] == pytest.approx(0.5e-5) and lrs[-1] == pytest.approx(0.5e-3)
    # no param_groups: exactly the previous two groups
    plain = build_optimizer(model.named_parameters(), {"lr": 1e-3, "weight_decay": 0.1})
    assert [g["weight_decay"] for g in plain.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 1e-3 for g in plain.param_groups)


def test_param_groups_is_a_root_option():
    cfg = compose(["plugin=causal_lm", "optim.param_groups=[{modules: [lm_head], lr: 1e-4}]"])
    assert cfg.optim.param_groups[0].modules == ["lm_head"]
    assert list(compose(["plugin=causal_lm"]).optim.param_groups) == []
