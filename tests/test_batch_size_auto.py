"""data.batch_size=auto: the largest batch that fits, found before training and invisible to it.

The out-of-memory is provoked deterministically on CPU: the objective's step raises the CPU
allocator's own error for a batch of more than ``LIMIT`` items.
"""

from __future__ import annotations

import pytest
import torch

from modalforge.batch_size import Found, check_options, recorded_batch_size, search
from modalforge.config import compose
from modalforge.errors import ConfigError, user_error
from modalforge.module import TrainingModule
from modalforge.plugins.text.causal_lm.objective import CausalLMObjective
from modalforge.run import run
from modalforge.validate import validate_config

from cli_helpers import FAST, run_cli

LIMIT = 20  # items per batch above which the step "runs out of memory"
QUICK = [*FAST, "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
         "checkpoint.export_on_end=false", "callbacks=none", "optim.warmup_steps=0", "data.block_size=32",
         "optim.lr=3e-3", "checkpoint.every_n_train_steps=4"]


@pytest.fixture
def limited(monkeypatch):
    """Batches above LIMIT items fail as the CPU allocator does; records the trained batches and losses."""
    original = CausalLMObjective.training_step
    seen: dict[str, list] = {"trial": [], "train": [], "losses": [], "start": []}
    phase = {"now": "trial"}

    def step(self, batch):  # noqa: ANN001, ANN202
        items = batch["input_ids"].shape[0]
        seen[phase["now"]].append(items)
        if items > LIMIT:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                               f"you tried to allocate {items << 30} bytes. Error code 12 (Cannot allocate memory)")
        out = original(self, batch)
        if phase["now"] == "train":
            seen["losses"].append(float(out.loss.detach()))
        return out

    def on_train_start(self):  # noqa: ANN001, ANN202 - the weights the first step starts from
        phase["now"] = "train"
        seen["start"] = [{k: v.detach().clone() for k, v in self.state_dict().items()}]

    monkeypatch.setattr(CausalLMObjective, "training_step", step)
    monkeypatch.setattr(TrainingModule, "on_train_start", on_train_start, raising=False)

    def reset() -> None:
        phase["now"] = "trial"
        for key in ("trial", "train", "losses", "start"):
            seen[key].clear()

    seen["reset"] = reset  # type: ignore[assignment]
    return seen


def test_the_search_finds_the_largest_power_of_two_and_training_is_as_without_it(tmp_path, limited, capsys):
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=8", "data.batch_size=auto"])
    trainer, module, datamodule = run(cfg, tmp_path / "auto")
    line = [ln for ln in capsys.readouterr().out.splitlines() if "data.batch_size=auto" in ln]
    assert line == ["[modalforge] data.batch_size=auto: 16 (largest tried 32: 32 ran out of memory); "
                    "set data.batch_size=16 to skip the search next time"]
    assert limited["trial"] == [2, 2, 4, 4, 8, 8, 16, 16, 32]  # two steps per size, up to the first failure
    assert datamodule.batch_size == 16 and set(limited["train"]) == {16} and trainer.global_step == 8
    auto_losses, auto_start = list(limited["losses"]), limited["start"][0]
    assert auto_losses[-1] < auto_losses[0]

    limited["reset"]()
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=8", "data.batch_size=16"])
    run(cfg, tmp_path / "fixed")
    assert limited["trial"] == []
    # The same weights at step 0, and the same batches and random draws after it: the same losses.
    fixed_start = limited["start"][0]
    assert fixed_start.keys() == auto_start.keys()
    assert all(torch.equal(fixed_start[k], auto_start[k]) for k in fixed_start)
    assert limited["losses"] == auto_losses

    # The checkpoint keeps the found value; a resume with auto reuses it without searching again.
    saved = torch.load(tmp_path / "auto" / "checkpoints" / "last.ckpt", weights_only=False)
    assert recorded_batch_size(saved) == 16
    limited["reset"]()
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=10", "data.batch_size=auto", "ckpt_path=last"])
    trainer, _, datamodule = run(cfg, tmp_path / "auto")
    out = capsys.readouterr().out
    assert "data.batch_size=auto: 16, as the checkpoint's run used" in out and "skip the search" not in out
    assert limited["trial"] == [] and set(limited["train"]) == {16} and trainer.global_step == 10


def test_binsearch_and_the_cap(tmp_path, limited, capsys):
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=2", "data.batch_size=auto",
                   "+data.batch_size_search=binsearch"])
    _, _, datamodule = run(cfg, tmp_path / "bin")
    assert datamodule.batch_size == LIMIT
    # Doubling up to the first failure, then bisecting between 16 and 32 (a failure ends its trial at once).
    assert limited["trial"] == [2, 2, 4, 4, 8, 8, 16, 16, 32, 24, 20, 20, 22, 21]
    assert "data.batch_size=auto: 20 (largest tried 32: 21 ran out of memory)" in capsys.readouterr().out

    limited["reset"]()
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=2", "data.batch_size=auto",
                   "+data.max_batch_size=12"])
    _, _, datamodule = run(cfg, tmp_path / "cap")
    assert datamodule.batch_size == 12 and max(limited["trial"]) == 12  # 2, 4, 8, then the cap itself
    assert ("data.batch_size=auto: 12 (largest tried 12: data.max_batch_size is 12); set data.batch_size=12"
            in capsys.readouterr().out)


def test_search_by_itself():
    fits = lambda limit: (lambda size: size <= limit)  # noqa: E731
    assert search(fits(20), 8192).size == 16 and search(fits(20), 8192, "binsearch").size == 20
    assert search(fits(1), 8192).size == 1 and search(fits(0), 8192).size == 0
    assert search(fits(10 ** 6), 100).size == 100  # the data set's size caps it, and is tried
    assert search(fits(10 ** 6), 1).tried == [(1, True)]
    found = search(fits(70), 100, "binsearch")
    assert found.size == 70 and found.failed == 71 and isinstance(found, Found)


def test_a_batch_of_one_that_does_not_fit_is_one_line(tmp_path, monkeypatch):
    def step(self, batch):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    monkeypatch.setattr(CausalLMObjective, "training_step", step)
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=2", "data.batch_size=auto"])
    with pytest.raises(Exception) as caught:
        run(cfg, tmp_path)
    err = user_error(caught.value)
    assert err is not None and err.where == "data.batch_size=auto"
    assert err.what == "even a batch of 1 ran out of memory (tried 2, 1)"
    assert "module.gradient_checkpointing=true" in err.hint and "data.batch_size=" not in err.hint


def test_other_errors_in_a_trial_are_not_taken_for_out_of_memory(tmp_path, monkeypatch):
    def step(self, batch):  # noqa: ANN001, ANN202
        raise ValueError("shapes do not match")

    monkeypatch.setattr(CausalLMObjective, "training_step", step)
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.max_steps=2", "data.batch_size=auto"])
    with pytest.raises(ValueError, match="shapes do not match"):
        run(cfg, tmp_path)


def test_config_accepts_auto_and_names_a_wrong_value():
    validate_config(compose(["plugin=causal_lm", "data.batch_size=auto"]))
    validate_config(compose(["plugin=image_classification", "data.batch_size=auto", "+data.max_batch_size=256"]))
    with pytest.raises(ConfigError) as caught:
        validate_config(compose(["plugin=causal_lm", "data.batch_size=banana"]))
    assert caught.value.where == "data.batch_size" and caught.value.what == "'banana' is not an integer or auto"
    assert "data.batch_size=auto" in caught.value.hint
    with pytest.raises(ConfigError, match="only used with data.batch_size=auto"):
        validate_config(compose(["plugin=causal_lm", "data.batch_size=8", "+data.max_batch_size=256"]))
    with pytest.raises(ConfigError, match="not one of: power, binsearch"):
        check_options({"batch_size": "auto", "batch_size_search": "linear"})
    with pytest.raises(ConfigError, match="not a positive integer"):
        check_options({"batch_size": "auto", "max_batch_size": 0})


def test_the_cli_says_a_wrong_batch_size_in_one_line(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", "data.batch_size=banana", f"run_dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error, hint = proc.stderr.strip().splitlines()[-2:]
    assert error == "error: data.batch_size: 'banana' is not an integer or auto"
    assert hint.startswith("hint: ") and "data.batch_size=auto" in hint


def test_several_processes_are_refused_in_one_line(tmp_path):
    cfg = compose(["plugin=causal_lm", *QUICK, "trainer.devices=2", "strategy=ddp", "data.batch_size=auto"])
    with pytest.raises(ConfigError) as caught:
        run(cfg, tmp_path)
    assert caught.value.where == "data.batch_size=auto" and "this run has 2" in caught.value.what
    assert "trainer.devices=1" in caught.value.hint
