"""A data file that changed under a resuming run is refused (or warned about), never silently trained on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modalforge.callbacks.data_identity import compare, identity, local_files
from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.run import run

FAST = ["plugin=causal_lm", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false", "module.num_samples=0", "trainer.limit_val_batches=0",
        "trainer.val_check_interval=null", "checkpoint.export_on_end=false", "logger=none", "data.block_size=32",
        "data.batch_size=2"]


def _text(n: int, word: str = "alpha") -> str:
    return "".join(f"{word} {i} beta gamma delta epsilon {i % 7} zeta eta theta\n" for i in range(n))


def _record(path: Path) -> dict:
    return {str(path): identity(path)}


def test_compare_tells_appended_from_changed(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(_text(50))
    recorded = _record(path)
    assert compare(recorded) == ([], [])
    with path.open("a") as handle:
        handle.write(_text(5, "more"))
    changed, appended = compare(recorded)
    assert not changed and appended and "a.txt" in appended[0]
    path.write_text(_text(50, "other"))  # same length, other bytes
    os.utime(path, ns=(1, 1))
    changed, _ = compare(recorded)
    assert changed and "rewritten" in changed[0]
    path.write_text(_text(20))  # truncated
    assert compare(recorded)[0]
    path.unlink()
    assert "gone" in compare(recorded)[0][0]


def test_local_files_of_paths_globs_folders_and_mixtures(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("d/x.jsonl", "d/y.jsonl", "z.txt"):
        (tmp_path / name).write_text("{}\n")
    specs = [[{"path": str(tmp_path / "d"), "weight": 1}, str(tmp_path / "*.txt")], {"a": "hf:org/name"}, None]
    assert [p.name for p in local_files(specs)] == ["x.jsonl", "y.jsonl", "z.txt"]


def _first_run(tmp_path: Path) -> tuple[Path, Path]:
    data, run_dir = tmp_path / "corpus.txt", tmp_path / "run"
    data.write_text(_text(300))
    run(compose([*FAST, f"data.train={data}", f"data.val={data}", "trainer.max_steps=2", f"run_dir={run_dir}"]),
        run_dir)
    return data, run_dir


def _resume(data: Path, run_dir: Path, *extra: str) -> None:
    run(compose([*FAST, f"data.train={data}", f"data.val={data}", "trainer.max_steps=3", f"run_dir={run_dir}",
                 "ckpt_path=last", *extra]), run_dir)


def test_a_replaced_data_file_is_refused_on_resume_and_warn_resumes(tmp_path):
    data, run_dir = _first_run(tmp_path)
    data.write_text(_text(300, "replaced"))
    with pytest.raises(DataError, match="corpus.txt.*changed since the checkpoint|changed since the checkpoint.*"
                                        "corpus.txt") as info:
        _resume(data, run_dir)
    assert "checkpoint.on_data_change=warn" in str(info.value.hint)
    with pytest.warns(UserWarning, match="data changed since the checkpoint"):
        _resume(data, run_dir, "checkpoint.on_data_change=warn")


def test_appended_records_resume_with_a_warning(tmp_path):
    data, run_dir = _first_run(tmp_path)
    with data.open("a") as handle:
        handle.write(_text(40, "appended"))
    with pytest.warns(UserWarning, match="data grew since the checkpoint"):
        _resume(data, run_dir)
