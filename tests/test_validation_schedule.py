"""Every run with validation data validates: at the end of one shorter than val_check_interval, and at step 0
with module.validate_on_start=true; a run that validated on schedule gets no extra pass."""

from __future__ import annotations

import pytest

from modalforge.config import compose
from modalforge.run import run

from cli_helpers import FAST, metric_rows

QUICK = ["plugin=causal_lm", *FAST, "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
         "callbacks=none", "checkpoint.export_on_end=false"]


def validated_at(run_dir) -> list[int]:  # noqa: ANN001
    """The logged steps of val/loss: Lightning logs a validation after step N at step N - 1 (its count of
    batches that stepped before this one), the step-0 baseline at 0."""
    return [int(r["step"]) for r in metric_rows(run_dir) if r.get("val/loss")]


def train(run_dir, *overrides: str) -> None:  # noqa: ANN001
    run(compose([*QUICK, f"run_dir={run_dir}", *overrides]), run_dir)


def test_a_run_shorter_than_val_check_interval_validates_at_its_end(tmp_path):
    train(tmp_path / "run", "trainer.max_steps=3")  # val_check_interval: 100
    assert validated_at(tmp_path / "run") == [2]  # after step 3


@pytest.mark.parametrize("steps, every, expected", [(4, 2, [1, 3]), (5, 2, [1, 3])])  # after steps 2 and 4
def test_a_run_that_validated_on_schedule_gets_no_extra_pass(tmp_path, steps, every, expected):
    train(tmp_path / "run", f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}")
    assert validated_at(tmp_path / "run") == expected


def test_validate_on_start_logs_a_step_0_baseline(tmp_path):
    train(tmp_path / "run", "trainer.max_steps=2", "trainer.val_check_interval=2", "module.validate_on_start=true")
    assert validated_at(tmp_path / "run") == [0, 1]  # before step 1, after step 2
    losses = [int(r["step"]) for r in metric_rows(tmp_path / "run") if r.get("train/loss")]
    assert losses == [0, 1]  # training logs as before


def test_no_validation_where_there_is_none_to_do(tmp_path):
    train(tmp_path / "run", "trainer.max_steps=2", "trainer.limit_val_batches=0", "module.validate_on_start=true")
    assert validated_at(tmp_path / "run") == []


def test_a_resumed_run_that_validated_before_gets_no_extra_pass(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_steps=3", "trainer.val_check_interval=3", "checkpoint.every_n_train_steps=3")
    train(run_dir, "trainer.max_steps=5", "trainer.val_check_interval=3", "ckpt_path=last")
    assert validated_at(run_dir) == [2]  # after step 3 only: the schedule fired before the checkpoint
