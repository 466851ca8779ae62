"""Bad input and faults: one clear error for every mistake, nothing silent, nothing overwritten.

A table of mistakes, one row per kind, each asserting that the error names *where*
(config key, file and line, folder) and *what*; then the CLI's error shape and exit
code, the run-directory rules, checkpoints that do not fit, and SIGKILL / SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.errors import USER_ERROR_EXIT, CheckpointError, ConfigError, RunDirError
from modalforge.run import run
from modalforge.validate import validate_config

from cli_helpers import FAST, run_cli, script, series

# ---- config mistakes: (overrides, where, words the message must hold) ---------------------------
CONFIG_ROWS = [
    (["plugin=causal_lm", "+trainer.max_step=2"], "trainer.max_step", ["unknown key", "max_steps"]),
    (["plugin=causal_lm", "optim.scheduler=cosin"], "optim.scheduler", ["'cosin'", "cosine, linear, constant"]),
    (["plugin=causal_lm", "optim.lr=abc"], "optim.lr", ["'abc'", "number"]),
    (["plugin=causal_lm", "trainer.precision=17"], "trainer.precision", ["17", "bf16-mixed"]),
    (["plugin=causal_lm", "+optim.foo=1"], "optim.foo", ["unknown key"]),
    (["plugin=causal_lm", "+data.bogus=1"], "data.bogus", ["unknown key", "CausalLMDataModule"]),
    (["plugin=reward_model", "+data.bogus=1"], "data.bogus", ["unknown key"]),  # **kwargs: the parent's signature
    (["plugin=sft", "data.batch_size=many"], "data.batch_size", ["'many'", "integer"]),
    (["plugin=causal_lm", "+objective.nope=1"], "objective.nope", ["unknown key"]),
    (["plugin=causal_lm", "+model.hidden=3"], "model.hidden", ["unknown key"]),
    (["plugin=causal_lm", "adapter=lora", "adapter.r=big"], "adapter.r", ["'big'", "integer"]),
    (["plugin=causal_lm", "+seedling=1"], "seedling", ["unknown top-level key"]),
    (["plugin=causal_lm", "module.gradient_checkpointing=maybe"], "module.gradient_checkpointing", ["'maybe'"]),
    (["plugin=causal_lm", "module.compile=fast"], "module.compile", ["'fast'", "blocks, model"]),
    # grouped options (a dataclass-typed parameter) are checked key by key, before any work
    (["plugin=diffusion", "+objective.ema.decy=0.9"], "objective.ema.decy", ["unknown key", "'decay'"]),
    (["plugin=diffusion", "objective.schedule.prediction_type=flo"], "objective.schedule.prediction_type",
     ["not one of", "epsilon", "'flow'"]),
    (["plugin=diffusion", "objective.ema.decay=fast"], "objective.ema.decay", ["'fast'", "number"]),
]


@pytest.mark.parametrize("overrides,where,words", CONFIG_ROWS, ids=[r[1] for r in CONFIG_ROWS])
def test_config_mistake_is_named_before_any_work(overrides, where, words):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert info.value.where == where
    text = str(info.value) + " " + (info.value.hint or "")
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


def test_every_shipped_plugin_default_validates():
    from modalforge import registry

    for name in sorted(registry.discover()):
        if name == "multitask":  # its tasks are the user's to name
            with pytest.raises(ConfigError, match="required") as info:
                validate_config(compose([f"plugin={name}"]))
            assert info.value.where == "tasks"
            validate_config(compose([f"plugin={name}", "tasks=[causal_lm,clip]"]))
            continue
        validate_config(compose([f"plugin={name}"]))


# ---- data mistakes: (plugin, file name, content, words) -----------------------------------------
def _csv_with_open_quote() -> str:
    rows = ["text"] + [f"document number {i}" for i in range(1, 300)]
    rows[20] = '"an unterminated quote starts here'
    return "\n".join(rows) + "\n"


DATA_ROWS = [
    ("causal_lm", "docs.csv", _csv_with_open_quote(), ["docs.csv", "line 21", "quote"]),
    ("causal_lm", "docs.jsonl", '{"text": "ok"}\n{"text": oops}\n', ["docs.jsonl", "line 2", "invalid JSON"]),
    ("sft", "chat.jsonl", '{"prompt": "2+2?", "completion": "4"}\n{"prompt": "1+1?", "completion": null}\n',
     ["chat.jsonl", "line 2", "completion", "null"]),
    ("sft", "chat.jsonl", '{"prompt": "2+2?", "completion": 4}\n', ["line 1", "completion", "int"]),
    ("sft", "chat.jsonl", '{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
     ["line 1", "no 'role'"]),
    ("dpo", "pairs.jsonl", '{"prompt": [{"content": "hi"}], "chosen": "a", "rejected": "b"}\n',
     ["pairs.jsonl", "line 1", "prompt[0]", "role"]),
    ("reward_model", "pairs.jsonl", '{"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}\n',
     ["pairs.jsonl", "line 1", "chosen[0]", "content"]),
    ("dpo", "pairs.jsonl", '{"prompt": "q", "chosen": "a"}\n', ["line 1", "missing field 'rejected'"]),
]


@pytest.mark.parametrize("plugin,name,content,words", DATA_ROWS, ids=[f"{r[0]}-{r[3][-1]}" for r in DATA_ROWS])
def test_bad_record_names_file_and_line(tmp_path, plugin, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    cfg = compose([f"plugin={plugin}", f"data.train={path}", f"data.val={path}"])
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, _convert_="all")
    with pytest.raises(DataError) as info:
        datamodule.setup("fit")
        datamodule.train_dataloader()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_too_little_data_for_one_batch_names_both_numbers(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1?", "completion": str(i + 1)}) + "\n" for i in range(6)))
    from hydra.utils import instantiate

    cfg = compose(["plugin=sft", f"data.train={path}", f"data.val={path}", "data.packing=false", "data.batch_size=16"])
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    with pytest.raises(DataError, match=r"6 example\(s\).*data.batch_size=16") as info:
        datamodule.train_dataloader()
    assert "at most 6" in info.value.hint


# ---- the run directory ----------------------------------------------------------------------------
def _tiny(run_dir: Path, *extra: str) -> list[str]:
    return ["plugin=causal_lm", *FAST, "trainer.max_steps=2", "trainer.limit_val_batches=0",
            "trainer.val_check_interval=null", "callbacks=none", "logger=none", f"run_dir={run_dir}", *extra]


def test_finished_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    run(compose(_tiny(run_dir)), run_dir)
    weights = (run_dir / "final" / "model.safetensors").read_bytes()
    with pytest.raises(RunDirError) as info:
        run(compose(_tiny(run_dir, "optim.lr=1e-2")), run_dir)
    assert str(run_dir) in str(info.value) and "ckpt_path=last" in info.value.hint and "overwrite=true" in info.value.hint
    assert (run_dir / "final" / "model.safetensors").read_bytes() == weights
    run(compose(_tiny(run_dir, "overwrite=true", "optim.lr=1e-2")), run_dir)  # the explicit switch
    assert (run_dir / "final" / "model.safetensors").read_bytes() != weights


def test_resume_with_nothing_to_resume_is_an_error(tmp_path):
    with pytest.raises(RunDirError, match="nothing to resume"):
        run(compose(_tiny(tmp_path / "typo", "ckpt_path=last")), tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "truncated"])
def test_unreadable_checkpoint_is_one_line(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 1}, bad)
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        bad.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        run(compose(_tiny(tmp_path / "run", f"ckpt_path={bad}")), tmp_path / "run")
    assert str(bad) in str(info.value) and "weights_only" not in str(info.value)


def test_resume_into_a_different_model_names_parameter_and_config_key(tmp_path):
    run_dir = tmp_path / "run"
    run(compose(_tiny(run_dir, "checkpoint.export_on_end=false")), run_dir)
    with pytest.raises(CheckpointError) as info:
        run(compose(_tiny(run_dir, "ckpt_path=last", "trainer.max_steps=4", "model.config.intermediate_size=96")),
            run_dir)
    assert "mlp" in str(info.value) and "in the checkpoint" in str(info.value)
    assert "model.config.intermediate_size: 176 -> 96" in info.value.hint


# ---- the CLI's shape -------------------------------------------------------------------------------
def test_cli_prints_error_last_and_exits_with_its_own_code(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", "+trainer.max_step=2", f"run_dir={tmp_path}/run", check=False)
    assert proc.returncode == USER_ERROR_EXIT
    lines = proc.stderr.strip().splitlines()
    assert lines[-2].startswith("error: trainer.max_step: unknown key") and lines[-1].startswith("hint: ")
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    debug = run_cli("train", "plugin=causal_lm", "+trainer.max_step=2", f"run_dir={tmp_path}/run", check=False,
                    env={"MODALFORGE_DEBUG": "1"})
    assert "Traceback" in debug.stderr and debug.returncode == USER_ERROR_EXIT


def test_failed_resume_keeps_the_finished_runs_config(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", *_tiny(run_dir))
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    proc = run_cli("train", *_tiny(run_dir, "trainer.max_steps=4", "model.config.intermediate_size=96",
                                   "ckpt_path=last"), check=False)
    assert proc.returncode == USER_ERROR_EXIT and proc.stderr.strip().splitlines()[-2].startswith("error: ckpt_path=")
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config
    assert (run_dir / ".hydra" / "attempt_1" / "config.yaml").exists()


# ---- faults ---------------------------------------------------------------------------------------
KILL_ARGS = [*FAST, "optim.scheduler=constant", "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
             "checkpoint.every_n_train_steps=3", "checkpoint.export_on_end=false", "trainer.max_steps=18",
             "trainer.deterministic=true", "callbacks=none"]


def _steps_logged(run_dir: Path) -> int:
    return len(series(run_dir, "train/loss")) if (run_dir / "csv").exists() else 0


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_to_the_same_loss(tmp_path):
    straight = tmp_path / "straight"
    run_cli("train", "plugin=causal_lm", *KILL_ARGS, f"run_dir={straight}")
    reference = series(straight, "train/loss")
    run_dir = tmp_path / "killed"
    kills = 0
    for attempt, kill_after in enumerate((4, 9, 13)):
        args = [script("train"), "plugin=causal_lm", *KILL_ARGS, f"run_dir={run_dir}"]
        if attempt:
            args.append("ckpt_path=last")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and _steps_logged(run_dir) < kill_after:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2
    run_cli("train", "plugin=causal_lm", *KILL_ARGS, f"run_dir={run_dir}", "ckpt_path=last")
    resumed = series(run_dir, "train/loss")
    assert 17 in reference and 17 in resumed
    assert resumed[17] == pytest.approx(reference[17], abs=1e-6)
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 18


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    args = [script("train"), "plugin=causal_lm", *FAST, "trainer.max_steps=100000", "trainer.limit_val_batches=0",
            "trainer.val_check_interval=null", "checkpoint.every_n_train_steps=100000", f"run_dir={run_dir}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and _steps_logged(run_dir) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "ckpt_path=last" in err
    state = torch.load(run_dir / "checkpoints" / "last-interrupted.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] >= 1


def test_empty_local_model_folder_is_named_not_sent_to_the_hub(tmp_path):
    from modalforge.errors import ModelLoadError

    empty = tmp_path / "my-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError) as info:
        run(compose(_tiny(tmp_path / "run", "model=causal_lm/pretrained", f"model.name_or_path={empty}")),
            tmp_path / "run")
    assert str(empty) in str(info.value) and "empty" in str(info.value)
    assert "hf download" not in str(info.value) + str(info.value.hint)


@pytest.mark.parametrize("plugin", ["clip", "diffusion", "image_classification"])
def test_missing_or_broken_images_are_found_before_training(tmp_path, plugin):
    """The header pass (data.verify) names the file at setup; skip_bad counts it out instead."""
    from hydra.utils import instantiate

    from modalforge.data.synthetic.shapes import write_shapes

    write_shapes(tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()[:24]]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows += [{**rows[0], "image": "gone.png"}, {**rows[1], "image": "broken.png"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"plugin={plugin}", f"data.train={manifest}", f"data.val={manifest}", "data.batch_size=4"]
    datamodule = instantiate(compose(base).data, _convert_="all")
    with pytest.raises(DataError, match="gone.png: image file not found") as info:
        datamodule.setup("fit")
    assert "data.skip_bad=true" in info.value.hint
    skipping = instantiate(compose([*base, "data.skip_bad=true"]).data, _convert_="all")
    skipping.setup("fit")
    assert len(skipping.train_set) == 24
