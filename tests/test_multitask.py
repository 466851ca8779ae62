"""multitask: several plugins' objectives in one run, one optimiser, modules shared by name."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from modalforge.config import compose
from modalforge.data.loader import ResumableDataLoader
from modalforge.errors import ConfigError
from modalforge.plugins.multimodal.multitask.data import TaskBatches
from modalforge.plugins.multimodal.multitask.tasks import parse_tasks
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

SHARE_TRUNK = "objective.share=[[causal_lm.model.model.layers,sft.model.model.layers]]"


def test_conforms_with_a_shared_transformer_trunk(tmp_path):
    report = assert_plugin_conforms("multitask", tmp_path, ["tasks=[causal_lm,sft]", "objective.mix=sum", SHARE_TRUNK],
                                    steps=6)
    assert any(".layers." in name for name in report.changed)


def test_shared_modules_are_one_module_and_one_set_of_weights(tmp_path):
    cfg = compose(["plugin=multitask", "tasks=[causal_lm,sft]", "objective.mix=sum", SHARE_TRUNK, *FAST,
                   "trainer.max_steps=2", "trainer.limit_val_batches=0", "callbacks=none", "logger=none",
                   f"run_dir={tmp_path}"])
    _, module, _ = run(cfg, tmp_path)
    tasks = module.objective.objectives
    assert tasks["causal_lm"].model.model.layers is tasks["sft"].model.model.layers
    assert tasks["causal_lm"].model.model.embed_tokens is not tasks["sft"].model.model.embed_tokens
    names = [n for n, _ in module.named_parameters()]
    assert not any(n.startswith("objective.objectives.sft.model.model.layers") for n in names)  # listed once
    assert (tmp_path / "final" / "causal_lm" / "config.json").exists() and (tmp_path / "final" / "sft").is_dir()


def _per_task_losses_fall(run_dir, tasks):
    for task in tasks:
        losses = series(run_dir, f"train/{task}/loss")
        values = [losses[k] for k in sorted(losses)]
        assert len(values) >= 8, (task, values)
        assert min(values[-3:]) < values[0] - 0.05, f"{task} did not learn: {values}"


@pytest.mark.parametrize("tasks,extra", [
    (["clip", "causal_lm"], []),                      # image + text
    (["whisper_asr", "causal_lm"], []),               # audio + text
], ids=["image+text", "audio+text"])
def test_two_modalities_train_together_and_both_learn(tmp_path, tasks, extra):
    cfg = compose(["plugin=multitask", f"tasks=[{','.join(tasks)}]", "objective.mix=sum", *FAST,
                   "trainer.max_steps=12", "trainer.val_check_interval=12", "trainer.limit_val_batches=1",
                   "callbacks=none", "checkpoint.export_on_end=false", f"run_dir={tmp_path}", *extra])
    trainer, _, _ = run(cfg, tmp_path)
    _per_task_losses_fall(tmp_path, tasks)
    for task in tasks:
        assert f"val/{task}/loss" in trainer.logged_metrics


class _Items(torch.utils.data.Dataset):
    def __init__(self, n, tag):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, i)


def _loaders():
    def collate(items):
        return items

    return {"a": torch.utils.data.DataLoader(_Items(50, "a"), batch_size=4, collate_fn=collate),
            "b": torch.utils.data.DataLoader(_Items(10, "b"), batch_size=2, collate_fn=collate)}


def test_task_draw_follows_weights_and_resumes_exactly():
    batches = TaskBatches(_loaders(), {"a": 3.0, "b": 1.0}, steps=400)
    loader = ResumableDataLoader(batches, 1, seed=1, collate_fn=lambda x: x[0])
    drawn = Counter(batch["task"] for batch in loader)
    assert 0.68 < drawn["a"] / 400 < 0.82
    loader.sampler.set_epoch(0)
    expected = [b for b in loader][:20]
    first = ResumableDataLoader(batches, 1, seed=1, collate_fn=lambda x: x[0])
    it = iter(first)
    seen = [next(it) for _ in range(7)]
    resumed = ResumableDataLoader(batches, 1, seed=1, collate_fn=lambda x: x[0])
    resumed.load_state_dict(first.state_dict())
    assert seen + [b for b in resumed][:13] == expected


@pytest.mark.parametrize("spec,where", [
    ([{"plugin": "clip", "weight": 0}, "causal_lm"], "tasks[0].weight"),
    (["clip", "clip"], "tasks"),
    ([{"plugin": "multitask"}], "tasks[0]"),
    ("clip", "tasks"),
])
def test_bad_task_lists_are_one_clear_error(spec, where):
    with pytest.raises(ConfigError) as info:
        parse_tasks(spec)
    assert info.value.where == where


def test_sharing_modules_of_different_shapes_names_both(tmp_path):
    cfg = compose(["plugin=multitask", "tasks=[causal_lm,sft]", "objective.mix=sum", *FAST, "trainer.max_steps=1",
                   "trainer.limit_val_batches=0", "callbacks=none", "logger=none", f"run_dir={tmp_path}"])
    cfg.tasks = [{"plugin": "causal_lm"}, {"plugin": "sft", "overrides": ["model.config.hidden_size=32"]}]
    cfg.objective.share = [["causal_lm.model.model.layers", "sft.model.model.layers"]]
    with pytest.raises(ConfigError) as info:
        run(cfg, tmp_path)
    assert "causal_lm.model.model.layers" in str(info.value) and "sft.model.model.layers" in str(info.value)
