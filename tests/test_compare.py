"""`modalforge compare` (core/compare/): the table and plots of real runs, and the summary a sweep writes."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import pytest

from cli_helpers import FAST, run_cli
from modalforge.compare import compare, direction, find_runs, format_table, load_run
from modalforge.errors import RunDirError

TINY_RUN = [*FAST, "trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "checkpoint.export_on_end=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-point sweep (`train -m`) of 2 causal_lm steps each; its end writes compare/."""
    folder = tmp_path_factory.mktemp("sweep") / "lr"
    run_cli("train", "-m", "plugin=causal_lm", *TINY_RUN, "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={folder}",
            cwd=folder.parent)
    return folder


def assert_real_png(path: Path, min_bytes: int = 8000) -> None:
    import matplotlib.pyplot as plt

    assert path.is_file() and path.stat().st_size > min_bytes, path
    pixels = plt.imread(str(path))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0.01, path


def test_a_sweep_writes_its_comparison_at_the_end(sweep: Path):
    report = sweep / "compare"
    table = (report / "summary.txt").read_text().splitlines()
    assert table[0].startswith("common to all runs: ") and "trainer.max_steps=2" in table[0]
    header = table[1].split()
    assert header[:6] == ["run", "plugin", "overrides", "steps", "wall", "time"]
    assert "val/loss" in header and "val/ppl" in header
    rows = {line.split()[0]: line.split() for line in table[3:5]}
    assert rows["0"][1:4] == ["causal_lm", "optim.lr=0.001", "2"] and rows["1"][2] == "optim.lr=0.003"
    for name in ("loss.png", "val_loss.png", "val_ppl.png"):
        assert_real_png(report / name)
    with (report / "summary.csv").open() as handle:
        summary = list(csv.DictReader(handle))
    assert [r["run"] for r in summary] == ["0", "1"] and summary[0]["finished"] == "True"
    run = load_run(sweep / "0", "0")
    final = run.curves["val/loss"][max(run.curves["val/loss"])]
    assert float(summary[0]["val/loss final"]) == pytest.approx(final)
    assert float(summary[0]["val/loss best"]) == pytest.approx(min(run.curves["val/loss"].values()))


def test_compare_command_on_run_dirs_prints_the_table(sweep: Path, tmp_path: Path):
    proc = run_cli("modalforge", "compare", str(sweep / "0"), str(sweep / "1"), "--out", str(tmp_path / "report"))
    assert "optim.lr=0.001" in proc.stdout and "optim.lr=0.003" in proc.stdout and "val/ppl (min)" in proc.stdout
    assert_real_png(tmp_path / "report" / "loss.png")
    assert "loss.png" in (tmp_path / "report" / "index.html").read_text()


def test_resumed_unfinished_confusion_and_sample_grids(sweep: Path, tmp_path: Path):
    """A run's resumed part, a missing finished.json, image_classification's confusion matrix, a sample grid."""
    import matplotlib.pyplot as plt
    import numpy as np

    run = tmp_path / "runs" / "resumed"
    shutil.copytree(sweep / "0", run)
    (run / "finished.json").unlink()
    (run / "csv" / "resumed_1").mkdir()
    (run / "csv" / "resumed_1" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss,val/acc\n0,2,5.0,,\n0,3,,4.5,0.25\n0,5,,4.9,0.5\n")
    # the file image_classification's Objective.save_artifacts writes into final/
    (run / "final").mkdir()
    (run / "final" / "confusion_matrix.csv").write_text("true\\predicted,cat,dog\ncat,3,1\ndog,2,4\n")
    (run / "images" / "samples").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for step in (2, 4):
        plt.imsave(run / "images" / "samples" / f"step{step:07d}.png", rng.random((64, 64, 3)))

    info = load_run(run, "resumed")
    assert not info.finished and info.steps == 6  # steps logged so far, marked `*` in the table
    assert info.curves["train/loss"][2] == 5.0 and info.final("val/loss") == 4.9 and info.best("val/loss") == 4.5
    assert info.best("val/acc") == 0.5 and info.images["samples"].name == "step0000004.png"
    assert "6*" in format_table([info])

    out = compare([run], plots=True)
    assert out == run / "compare"
    assert_real_png(out / "confusion_resumed.png")
    assert_real_png(out / "samples.png")
    assert_real_png(out / "val_acc.png")
    assert (out / "samples_resumed_samples_step0000004.png").read_bytes() == \
        (run / "images" / "samples" / "step0000004.png").read_bytes()
    assert (out / "confusion_resumed.csv").is_file()


def test_without_matplotlib_the_table_is_printed_with_how_to_get_plots(sweep: Path, tmp_path: Path, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    out = compare([sweep], out=tmp_path / "report")
    printed = capsys.readouterr().out
    assert "optim.lr=0.003" in printed and 'pip install "modalforge[plots]"' in printed
    assert (out / "summary.txt").is_file() and not list(out.glob("*.png"))


def test_paths_without_runs_are_one_line_errors(tmp_path: Path, capsys):
    from modalforge import cli

    with pytest.raises(RunDirError, match="does not exist"):
        find_runs([tmp_path / "missing"])
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: holds no run") and "Traceback" not in err


@pytest.mark.parametrize("metric, expected", [
    ("val/loss", "min"), ("val/ppl", "min"), ("val/wer", "min"), ("val/cer", "min"), ("val/fid", "min"),
    ("val/mse_t0.00-0.25", "min"), ("val/clean/loss", "min"), ("val/acc", "max"), ("val/acc_top5", "max"),
    ("val/recall@1", "max"), ("val/zeroshot_acc", "max"), ("val/preference_accuracy", "max"),
    ("val/codevector_perplexity", "max"), ("val/reward", "max"), ("val/reward_std", None), ("val/chance", None),
])
def test_best_is_min_for_loss_like_and_max_for_accuracy_like(metric, expected):
    assert direction(metric) == expected


def _hand_made_run(folder: Path, override: str, sample: str) -> Path:
    """A run directory as train leaves it (config, overrides, metrics, samples), written by hand: no training."""
    import json

    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("plugin:\n  name: causal_lm\n")
    (folder / ".hydra" / "overrides.yaml").write_text(f"- plugin=causal_lm\n- {json.dumps(override)}\n")
    (folder / "csv").mkdir()
    (folder / "csv" / "metrics.csv").write_text("step,train/loss,val/loss\n0,2.0,\n1,1.5,1.6\n")
    rows = [{"step": 1, "index": 0, "input": "<b>prompt</b>", "sample": sample}]
    (folder / "csv" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_index_html_escapes_what_runs_wrote(tmp_path: Path):
    """Override values, run names and model-written samples are shown in index.html, never run as markup."""
    script = "<script>alert('x')</script>"
    runs = [_hand_made_run(tmp_path / "a<i>", f"data.prompt={script}", f"{script} & \"quoted\""),
            _hand_made_run(tmp_path / "b", "data.prompt=plain", "a plain sample")]
    report = compare([str(p) for p in runs], out=tmp_path / "report", plots=False)
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and "<i>" not in page and "<b>" not in page
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 2  # the override and the sample
    assert "samples of a&lt;i&gt; at step 1" in page and "&amp; &quot;quoted&quot;" in page
    assert "a plain sample" in page
