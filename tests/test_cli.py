"""The `train` and `modalforge` console scripts end to end, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import FAST, run_cli, script, series


def test_train_without_plugin_lists_plugins():
    proc = run_cli("train")
    assert "usage: train plugin=<name>" in proc.stdout and "causal_lm" in proc.stdout
    for flag in ("--help", "-h"):  # Hydra's help would need a plugin to compose: the usage instead, exit 0
        proc = run_cli("train", flag)
        assert "usage: train plugin=<name>" in proc.stdout and "Traceback" not in proc.stderr


def test_unknown_plugin_lists_installed_ones():
    proc = run_cli("train", "plugin=nope", check=False)
    assert proc.returncode != 0
    assert "unknown plugin 'nope'" in proc.stderr and "causal_lm" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_modalforge_plugins_lists_package_and_description():
    proc = run_cli("modalforge", "plugins")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("causal_lm"))
    assert "text" in line and "modalforge 0.1.0" in line and "next-token" in line


def test_trainer_typo_is_rejected_with_the_key_named(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", "trainer.max_step=3", f"run_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "max_step" in proc.stderr


def test_any_trainer_argument_is_accepted(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", *FAST, "trainer.max_steps=2", "trainer.limit_val_batches=0",
                   "trainer.detect_anomaly=true", "trainer.accumulate_grad_batches=2", "trainer.deterministic=true",
                   f"run_dir={tmp_path}", "--cfg", "job")
    assert "detect_anomaly: true" in proc.stdout and "accumulate_grad_batches: 2" in proc.stdout


def test_missing_data_path_is_one_clear_line(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", *FAST, f"data.train={tmp_path}/nothing/*.jsonl",
                   f"run_dir={tmp_path}/run", check=False)
    assert proc.returncode == 2
    assert "data.train" in proc.stderr and "nothing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    proc = run_cli("train", "plugin=causal_lm", *FAST, f"data.train={data}", f"run_dir={tmp_path}/run", check=False)
    assert proc.returncode == 2
    assert "corpus.jsonl" in proc.stderr and "line 3" in proc.stderr and "Traceback" not in proc.stderr


def test_unloadable_model_name_says_how_to_use_a_local_folder(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", *FAST, "model.name_or_path=some-org/not-here",
                   f"run_dir={tmp_path}/run", check=False)
    assert proc.returncode == 2
    assert "some-org/not-here" in proc.stderr and "model.name_or_path=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_end_to_end_run_writes_checkpoints_logs_samples_and_hf_export(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("train", "plugin=causal_lm", *FAST, "module.num_samples=2", "trainer.max_steps=30",
            "trainer.val_check_interval=15", "trainer.limit_val_batches=3", "checkpoint.every_n_train_steps=15",
            f"run_dir={run_dir}")
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    losses = series(run_dir, "train/loss")
    assert len(losses) >= 25 and "val/ppl" in (run_dir / "csv" / "metrics.csv").read_text()
    samples = [json.loads(l) for l in (run_dir / "csv" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {15, 30} and all(s["sample"] for s in samples)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("the red fox", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    assert json.loads((final / "modalforge.json").read_text())["plugin"] == "causal_lm"


def test_resume_continues_the_loss_curve(tmp_path):
    common = [*FAST, "optim.scheduler=constant", "optim.warmup_steps=0", "trainer.limit_val_batches=0",
              "checkpoint.every_n_train_steps=10", "checkpoint.export_on_end=false", "trainer.gradient_clip_val=null"]
    straight = tmp_path / "straight"
    run_cli("train", "plugin=causal_lm", *common, "trainer.max_steps=20", f"run_dir={straight}")
    split = tmp_path / "split"
    run_cli("train", "plugin=causal_lm", *common, "trainer.max_steps=10", f"run_dir={split}")
    run_cli("train", "plugin=causal_lm", *common, "trainer.max_steps=20", f"run_dir={split}", "ckpt_path=last")
    a, b = series(straight, "train/loss"), series(split, "train/loss")
    assert set(range(10, 20)) <= set(b), f"resumed run did not log steps 10..19: {sorted(b)}"
    for step in range(10, 20):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), f"step {step}: {b[step]} vs {a[step]}"


def test_ctrl_c_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    args = [script("train"), "plugin=causal_lm", *FAST, "trainer.max_steps=100000", "trainer.limit_val_batches=0",
            "checkpoint.every_n_train_steps=100000", "trainer.val_check_interval=null", f"run_dir={run_dir}"]
    # SIGINT may be ignored by a CI runner's background job; the child must get the default, like a terminal.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = run_dir / "csv" / "metrics.csv"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") > 5):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    interrupted = run_dir / "checkpoints" / "last-interrupted.ckpt"
    assert interrupted.exists(), f"no checkpoint after Ctrl-C in {list((run_dir / 'checkpoints').glob('*'))}"
    state = torch.load(interrupted, map_location="cpu", weights_only=False)
    step = state["global_step"]
    assert step > 0
    run_cli("train", "plugin=causal_lm", *FAST, f"trainer.max_steps={step + 3}", "trainer.limit_val_batches=0",
            "trainer.val_check_interval=null", f"run_dir={run_dir}", "ckpt_path=last")
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == step + 3
    loader_state = resumed["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["batches_yielded"] == step + 3  # one epoch is longer than this run


def test_multirun_sweep(tmp_path):
    run_cli("train", "-m", "plugin=causal_lm", *FAST, "optim.lr=1e-3,3e-4", "trainer.max_steps=2",
            "trainer.limit_val_batches=0", "checkpoint.export_on_end=false", f"hydra.sweep.dir={tmp_path}")
    assert (tmp_path / "0" / "csv" / "metrics.csv").exists() and (tmp_path / "1" / "csv" / "metrics.csv").exists()
    assert "lr: 0.0003" in (tmp_path / "1" / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "ddp"
    run_cli("train", "plugin=causal_lm", "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
            "trainer.log_every_n_steps=1", "module.num_samples=0", f"run_dir={run_dir}")
    assert len(series(run_dir, "train/loss")) >= 5
    assert (run_dir / "final" / "model.safetensors").exists()


def test_unknown_config_key_is_rejected(tmp_path):
    proc = run_cli("train", "plugin=causal_lm", "optim.learning_rate=1", f"run_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "learning_rate" in proc.stderr


def test_wheel_install_ships_configs_and_finds_plugins(tmp_path):
    """A built wheel (not the editable checkout) carries the YAML and the entry points."""
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(root)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("modalforge-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import modalforge, sys; from modalforge.config import compose; "
            "cfg = compose(['plugin=causal_lm', 'adapter=lora', 'strategy=ddp', 'logger=tensorboard']); "
            "print(modalforge.__file__); print(cfg.data._target_, cfg.adapter._target_, cfg.strategy.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(site) in out.stdout
    assert "CausalLMDataModule modalforge.adapters.LoraAdapter ddp" in out.stdout
