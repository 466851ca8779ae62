"""A NaN or Inf loss or gradient stops the run in one line, the last good checkpoint kept; or the step is skipped."""

from __future__ import annotations

import math

import pytest
import torch

from modalforge.callbacks.nonfinite import NonFiniteError, NonFiniteGuard, gradient_norm
from modalforge.config import compose
from modalforge.errors import USER_ERROR_EXIT, ConfigError, user_error
from modalforge.plugins.text.causal_lm.objective import CausalLMObjective
from modalforge.run import run
from modalforge.validate import validate_config

from cli_helpers import FAST, run_cli, series

QUICK = [*FAST, "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
         "checkpoint.export_on_end=false", "callbacks=none", "optim.warmup_steps=0"]


def _nan_on(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """The causal_lm objective's loss is NaN on these training steps (1-based): a poisoned batch."""
    original = CausalLMObjective.training_step
    calls = {"n": 0}

    def poisoned(self, batch):  # noqa: ANN001, ANN202
        calls["n"] += 1
        out = original(self, batch)
        if calls["n"] in steps:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CausalLMObjective, "training_step", poisoned)


def test_a_step_too_far_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # optim.lr=1e10: step 1's weights are finite but huge, so step 2's loss and gradients are NaN.
    proc = run_cli("train", "plugin=causal_lm", *QUICK, "trainer.max_steps=6", "checkpoint.every_n_train_steps=1",
                   "optim.lr=1e10", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()
    assert last[-2].startswith("error: step 2 (batch 1 of epoch 0): ") and "is nan" in last[-2], last[-2:]
    assert "last.ckpt (step 1), is kept" in last[-2] and last[-1].startswith("hint: lower optim.lr")
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-interrupted
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_a_nan_batch_stops_before_the_weights_take_it(tmp_path, monkeypatch):
    _nan_on(monkeypatch, {3})
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=5", "checkpoint.every_n_train_steps=1"])
    with pytest.raises(NonFiniteError) as caught:
        run(cfg, tmp_path)
    err = caught.value
    assert err.where == "step 3 (batch 2 of epoch 0)" and "the loss is nan" in err.what
    assert "last.ckpt (step 2), is kept" in err.what and "module.nonfinite=skip" in err.hint
    assert user_error(err) is err  # the CLI prints it as one line and exits 2
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (tmp_path / "checkpoints" / "last-interrupted.ckpt").exists()


def test_skip_leaves_weights_and_optimizer_state_alone_and_counts_the_step(tmp_path, monkeypatch):
    _nan_on(monkeypatch, {3})
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=5", "module.nonfinite=skip",
                   "checkpoint.every_n_train_steps=100"])
    trainer, module, _ = run(cfg, tmp_path)
    assert trainer.global_step == 5
    optimizer = trainer.optimizers[0]
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {4}  # five steps, one of them skipped: Adam moved every parameter four times
    assert all(torch.isfinite(p).all() for p in module.parameters())
    skipped = series(tmp_path, "train/skipped_steps")
    assert skipped and min(skipped.values()) == 1 and max(skipped.values()) == 1


def test_skip_stops_after_too_many_in_a_row(tmp_path, monkeypatch):
    _nan_on(monkeypatch, set(range(2, 20)))
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=10", "module.nonfinite=skip",
                   "module.max_skipped_steps=2"])
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(more than module.max_skipped_steps=2; 2 skipped"):
        run(cfg, tmp_path)


def test_the_guard_is_configured_and_checked(tmp_path):
    with pytest.raises(ConfigError, match="'skp' is not one of: stop, skip, off"):
        validate_config(compose(["plugin=causal_lm", "module.nonfinite=skp"]))
    norm = gradient_norm([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(1))])
    assert norm is None  # no gradients yet
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    p.grad = torch.full((4,), 300.0, dtype=torch.float16)  # the norm's square overflows float16, not float32
    assert gradient_norm([p]).item() == pytest.approx(600.0)
    p.grad[1] = math.inf
    assert not torch.isfinite(gradient_norm([p]))
    with pytest.raises(ValueError):
        NonFiniteGuard("sometimes")  # type: ignore[arg-type]


ONE_RANK_NAN = """
import sys
import torch
from modalforge.plugins.text.causal_lm.objective import CausalLMObjective

original, calls = CausalLMObjective.training_step, [0]

def poisoned(self, batch):
    calls[0] += 1
    out = original(self, batch)
    if calls[0] == 3 and torch.distributed.get_rank() == 1:
        out.loss = out.loss + torch.tensor(float("nan"))  # this rank's loss only: the gradients stay finite
    return out

CausalLMObjective.training_step = poisoned
from modalforge.cli import train
train()
"""


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    import os
    import subprocess
    import sys

    wrapper = tmp_path / "train_poisoned.py"
    wrapper.write_text(ONE_RANK_NAN)
    proc = subprocess.run([sys.executable, str(wrapper), "plugin=causal_lm", *QUICK, "strategy=ddp",
                           "trainer.devices=2", "trainer.max_steps=6", "checkpoint.every_n_train_steps=1",
                           "strategy.timeout=60", f"run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr[-3000:]
    # Rank 0's loss was finite: it stops on the all-reduced verdict, before the step's own collectives.
    assert "error: step 3 (batch 2 of epoch 0): another rank's loss or gradient norm is not finite" in proc.stderr, proc.stderr[-3000:]
    assert "timed out" not in proc.stderr


def test_an_infinite_reward_stops_a_grpo_run(tmp_path):
    # grpo scores a NaN reward as "unscorable" (no advantage of its own); an Inf reward has no such meaning.
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def boundless(prompts, completions, **kwargs):\n"
                       "    return [float('inf')] + [0.0] * (len(completions) - 1)\n")
    cfg = compose(["plugin=grpo", *QUICK, "model=grpo/tiny_llama", f"objective.rewards=['{rewards}:boundless']",
                   "data.batch_size=4", "objective.num_generations=4", "objective.max_completion_length=4",
                   "trainer.max_steps=3"])
    with pytest.raises(NonFiniteError, match=r"the loss is nan|the gradient norm is nan") as caught:
        run(cfg, tmp_path)
    assert caught.value.where == "step 1 (batch 0 of epoch 0)"
    assert "no checkpoint was written before it" in caught.value.what
