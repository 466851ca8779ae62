"""``modalforge eval`` (a run's validation on any data, no training) and ``modalforge generate`` (samples from final/)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import run_cli, series
from modalforge.cli import main

TRAIN = ["trainer.max_steps=4", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_model_summary=false",
         "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "module.num_samples=0"]
QUIET = {"MODALFORGE_QUIET": "1", "OMP_NUM_THREADS": "1"}
VAL_KEYS = {"sft": ("val/loss", "val/token_acc"), "image_classification": ("val/loss", "val/acc")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for plugin in ("sft", "image_classification"):
        run_dir = root / plugin
        run_cli("train", f"plugin={plugin}", *TRAIN, f"run_dir={run_dir}", env=QUIET)
        out[plugin] = run_dir
    return out


def _eval(capsys: pytest.CaptureFixture, *args: str, note: str | None = None) -> tuple[Path, dict[str, float]]:
    main(["eval", *args, "trainer.enable_progress_bar=false"])
    printed = capsys.readouterr().out
    assert note is None or note in printed, printed
    folder = Path(printed.strip().splitlines()[-1].split("(modalforge compare ", 1)[1].rstrip(")"))
    with (folder / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    metrics = {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}
    for key, value in metrics.items():  # the table shows what the file holds
        assert any(line.split()[:1] == [key] and abs(float(line.split()[1]) - value) <= 1e-5 * max(1, abs(value))
                   for line in printed.splitlines()), (key, printed)
    return folder, metrics


def _last_validation(run_dir: Path, key: str) -> float:
    points = series(run_dir, key)
    return points[max(points)]


def _user_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1, lines
    return error[0]


@pytest.mark.parametrize("plugin", ["sft", "image_classification"])
def test_eval_of_the_run_and_of_final_repeats_the_last_validation(runs, capsys, plugin):
    run_dir = runs[plugin]
    # image_classification's model names no folder (model.name): its final/ is scored from the last checkpoint
    fallback = "evaluating the run's newest checkpoint" if plugin == "image_classification" else None
    for source, note in ((run_dir, None), (run_dir / "final", fallback)):
        folder, metrics = _eval(capsys, str(source), note=note)
        assert folder.parent == run_dir / "eval" and (folder / ".hydra" / "config.yaml").is_file()
        for key in VAL_KEYS[plugin]:
            assert metrics[key] == pytest.approx(_last_validation(run_dir, key), rel=1e-5, abs=1e-6), (source, key)
        assert json.loads((folder / "finished.json").read_text())["step"] == 4
        assert not list(folder.glob("**/*.ckpt")) and not (folder / "final").exists()  # nothing trained


def test_eval_on_other_data_is_a_run_that_compare_reads(runs, capsys, tmp_path):
    run_dir = runs["sft"]
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"What is {a}+{a}?", "completion": str(2 * a)}) + "\n"
                             for a in range(12)))
    folder, metrics = _eval(capsys, str(run_dir / "final"), f"data.val={other}", "data.packing=false")
    assert set(VAL_KEYS["sft"]) <= set(metrics)
    assert metrics["val/loss"] != pytest.approx(_last_validation(run_dir, "val/loss"), rel=1e-5)
    proc = run_cli("modalforge", "compare", str(folder), env=QUIET)
    row = next(line for line in proc.stdout.splitlines() if line.startswith(folder.name))
    assert "sft" in row and f"{metrics['val/loss']:.4g}" in row
    assert f"data.val={other}" in (folder / ".hydra" / "overrides.yaml").read_text()


def test_eval_errors_are_one_line(runs, capsys, tmp_path):
    run_dir = runs["sft"]
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", lone / "last.ckpt")
    assert "no run config" in _user_error(capsys, "eval", str(lone / "last.ckpt"))
    assert "holds no checkpoint" in _user_error(capsys, "eval", str(tmp_path))
    assert "no validation" in _user_error(capsys, "eval", str(run_dir), "trainer.limit_val_batches=0")
    assert "unknown key" in _user_error(capsys, "eval", str(run_dir), "data.no_such_key=1")


def test_generate_prints_completions_and_stops_at_the_end_of_turn(runs, tmp_path):
    from transformers import AutoTokenizer

    from modalforge.cli.generate import generate
    from modalforge.text.stops import end_of_turn_tokens

    final = runs["sft"] / "final"
    proc = run_cli("modalforge", "generate", str(final), "--prompt", "What is 2+3?", "--max-new-tokens", "4",
                   env=QUIET)
    assert "prompt: What is 2+3?\ncompletion:" in proc.stdout
    # A copy whose generation_config biases "5" then the end of turn: greedy says "5" and stops there.
    biased = tmp_path / "biased"
    shutil.copytree(final, biased)
    tokenizer = AutoTokenizer.from_pretrained(final)
    end = tokenizer.convert_tokens_to_ids(end_of_turn_tokens(tokenizer)[0])
    five = tokenizer.convert_tokens_to_ids("5")
    assert end != tokenizer.eos_token_id
    config = json.loads((biased / "generation_config.json").read_text())
    config["eos_token_id"] = tokenizer.eos_token_id  # the stop must come from the template, not this file
    config["sequence_bias"] = [[[five], 100.0], [[five, end], 200.0]]
    (biased / "generation_config.json").write_text(json.dumps(config))
    (prompts := tmp_path / "prompts.txt").write_text("What is 2+3?\n\nWhat is 1+4?\n")
    completions = generate(biased, ["What is 2+3?"], max_new_tokens=8)
    assert completions[0].token_ids == [five, end] and completions[0].text == "5"
    proc = run_cli("modalforge", "generate", str(biased), "--file", str(prompts), "--max-new-tokens", "8", env=QUIET)
    assert proc.stdout.count("completion: 5\n") == 2


def test_generate_errors_are_one_line(runs, capsys):
    found = _user_error(capsys, "generate", str(runs["image_classification"] / "final"), "--prompt", "x")
    assert "no Hugging Face model" in found and "model.safetensors" in found
    assert "no prompt" in _user_error(capsys, "generate", str(runs["sft"] / "final"))
    assert "does not exist" in _user_error(capsys, "generate", str(runs["sft"] / "nowhere"), "--prompt", "x")
