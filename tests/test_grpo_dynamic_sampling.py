"""grpo's dynamic sampling (DAPO): ``drop`` shrinks the batch, ``refill`` draws further prompt groups from the
training stream, in order, until the batch is full of informative groups (bounded by ``max_refill_rounds``), and a
run resumed mid-rollout is exact with it."""

from __future__ import annotations

import json

import pytest
import torch

from modalforge.config import compose
from modalforge.errors import ModalforgeError
from modalforge.run import build_components, run

from cli_helpers import FAST, series
from tiny_models import built_objective

G = 2
SMOKE = ["model=grpo/tiny_llama", "data.batch_size=4", f"objective.num_generations={G}",
         "objective.max_completion_length=3", "objective.beta=0", "optim.warmup_steps=0",
         f"objective.rewards=[{__file__}:live_or_flat]"]


def live_or_flat(prompts, completions, kind, **_):
    """Constant on ``flat`` prompts (no advantage), different within the group on ``live`` ones."""
    return [float(i % G) if k == "live" else 0.0 for i, k in enumerate(kind)]


def _prompts(tmp_path, live_every: int = 3):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "kind": "live" if i % live_every == 0 else "flat"}) + "\n"
                            for i in range(24)))
    return [f"data.train={path}", f"data.val={path}"]


def test_values_and_errors():
    for value, mode in (("false", "off"), ("true", "drop"), ("drop", "drop"), ("refill", "refill")):
        cfg = compose(["plugin=grpo", *SMOKE, f"objective.dynamic_sampling={value}"])
        assert build_components(cfg)[1].dynamic_sampling == mode
    with pytest.raises(ModalforgeError, match=r"^objective.dynamic_sampling='refil' is not one of: false, drop, "
                                              r"refill \(true: drop\)$"):
        build_components(compose(["plugin=grpo", *SMOKE, "objective.dynamic_sampling=refil"]))
    with pytest.raises(ModalforgeError, match="objective.max_refill_rounds=-1 must be"):
        build_components(compose(["plugin=grpo", *SMOKE, "objective.max_refill_rounds=-1"]))


def test_refill_fills_the_batch_with_informative_groups_drop_shrinks_it(tmp_path):
    data = _prompts(tmp_path)  # one prompt in three is informative
    objective, batch = built_objective(["plugin=grpo", *SMOKE, *data, "objective.dynamic_sampling=drop"])
    objective.training_step(batch)
    assert len(objective._rollout) < 4 * G and objective._rollout_metrics["dynamic_sampling/dropped_groups"] > 0

    objective, batch = built_objective(["plugin=grpo", *SMOKE, *data, "objective.dynamic_sampling=refill",
                                        "objective.max_refill_rounds=8"])
    draws = 0
    for _ in range(2):  # two rollouts: the second continues the stream where the first stopped
        objective._rollout = None
        objective.training_step(batch)
        rollout, metrics = objective._rollout, objective._rollout_metrics
        assert len(rollout) == 4 * G
        groups = rollout.advantages.view(-1, G)
        assert (groups[:, 0] != groups[:, 1]).all()  # every group informative
        assert metrics["dynamic_sampling/filled"] == 1.0
        assert metrics["dynamic_sampling/groups_generated"] > 4 and metrics["dynamic_sampling/refill_rounds"] >= 1
        assert metrics["dynamic_sampling/groups_generated"] == 4 * (1 + metrics["dynamic_sampling/refill_rounds"])
        draws += 1 + int(metrics["dynamic_sampling/refill_rounds"])
    epoch, offset = objective._prompt_cursor
    assert epoch * 24 + offset == 4 * draws  # every draw took the next 4 prompts of the stream
    # bounded: no refill round allowed trains on what the first draw had, and says so in the metrics
    objective, batch = built_objective(["plugin=grpo", *SMOKE, *data, "objective.dynamic_sampling=refill",
                                        "objective.max_refill_rounds=0"])
    objective.training_step(batch)
    metrics = objective._rollout_metrics
    assert metrics["dynamic_sampling/groups_generated"] == 4 and metrics["dynamic_sampling/refill_rounds"] == 0
    assert metrics["dynamic_sampling/filled"] == len(objective._rollout) / (4 * G) < 1


def test_prompts_come_from_the_stream_in_order_without_repeats(tmp_path):
    objective, _ = built_objective(["plugin=grpo", *SMOKE, *_prompts(tmp_path), "objective.dynamic_sampling=refill"])
    dm = objective.datamodule
    stream = [p for b in dm.train_dataloader() for p in b["prompts"]]
    drawn = [p for _ in range(len(stream) // 4) for p in objective._next_prompts(torch.device("cpu"))["prompts"]]
    assert drawn == stream and len(set(drawn)) == len(drawn) == 24
    assert objective._prompt_cursor == (0, 24)
    assert objective._next_prompts(torch.device("cpu"))["prompts"] != drawn[:4]  # epoch 1: reshuffled
    assert objective._prompt_cursor == (1, 4)


def test_resume_mid_rollout_is_exact_with_refill(tmp_path):
    common = ["plugin=grpo", *FAST, *SMOKE, *_prompts(tmp_path), "objective.dynamic_sampling=refill",
              "objective.num_iterations=2", "objective.steps_per_generation=2", "trainer.val_check_interval=null",
              "trainer.limit_val_batches=0", "checkpoint.every_n_train_steps=3", "checkpoint.export_on_end=false",
              "trainer.enable_progress_bar=false", "callbacks=none"]
    _, straight, _ = run(compose([*common, "trainer.max_steps=8"]), tmp_path / "a")
    run(compose([*common, "trainer.max_steps=3"]), tmp_path / "b")   # stops at step 3 of 4 of the first rollout
    _, resumed, _ = run(compose([*common, "trainer.max_steps=8", "ckpt_path=last"]), tmp_path / "b")
    a, b = series(tmp_path / "a", "train/loss"), series(tmp_path / "b", "train/loss")
    assert [a[s] for s in sorted(a)] == pytest.approx([b[s] for s in sorted(b)], abs=1e-6)
    generated = series(tmp_path / "b", "train/dynamic_sampling/groups_generated")
    assert generated and all(v > 4 for v in generated.values())
    for (name, x), (_, y) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, msg=name)
