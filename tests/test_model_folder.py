"""A full disk while writing final/ leaves the previous final/ (or nothing), says so, and a rerun writes it."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.errors import format_user_error
from modalforge.model_folder import ModelFolderError, write_model_folder
from modalforge.module import TrainingModule
from modalforge.run import run

from cli_helpers import FAST


def _disk_fills_after_half(export):
    """``export`` whose disk fills up: every file it wrote is cut to half, then the next write fails."""
    def failing(self, directory, *, merge=False):
        export(self, directory, merge=merge)
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    return failing


class _Writes:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def export(self, directory, *, merge=False):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"x" * 4096)
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        return Path(directory)


def test_a_failed_write_removes_its_copy_and_keeps_the_previous_folder(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(ModelFolderError, match="No space left on device after 0.0 MB; the partial copy was removed "
                                               "and nothing was left there") as info:
        write_model_folder(final, _Writes(fail=True), merge=False, metadata={}, hint="free space")
    assert sorted(tmp_path.iterdir()) == []
    assert format_user_error(info.value)[-1] == "hint: free space"

    write_model_folder(final, _Writes(fail=False), merge=False, metadata={"global_step": 1}, hint="")
    with pytest.raises(ModelFolderError, match="the previous one is kept"):
        write_model_folder(final, _Writes(fail=True), merge=False, metadata={"global_step": 2}, hint="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert json.loads((final / "modalforge.json").read_text())["global_step"] == 1

    write_model_folder(final, _Writes(fail=False), merge=False, metadata={"global_step": 3}, hint="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert json.loads((final / "modalforge.json").read_text())["global_step"] == 3


def test_a_full_disk_at_the_end_of_a_rerun_keeps_the_previous_final_and_a_rerun_writes_it(tmp_path, monkeypatch):
    args = ["plugin=causal_lm", *FAST, "trainer.limit_val_batches=0", "callbacks=none", "logger=none"]
    run(compose([*args, "trainer.max_steps=3"]), tmp_path)
    final = tmp_path / "final"
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    assert json.loads(before["modalforge.json"])["global_step"] == 3

    monkeypatch.setattr(TrainingModule, "export", _disk_fills_after_half(TrainingModule.export))
    with pytest.raises(ModelFolderError) as info:  # training on to step 5, then the disk is full
        run(compose([*args, "trainer.max_steps=5", "ckpt_path=last"]), tmp_path)
    lines = format_user_error(info.value)
    assert lines[0].startswith(f"error: {final}: could not be written: No space left on device after ")
    assert lines[0].endswith("the partial copy was removed and the previous one is kept")
    assert lines[1] == ("hint: free space, then the same command plus ckpt_path=last writes final/ from the "
                        "last checkpoint (at this step)")
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before  # the step-3 final/, untouched
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last-interrupted.ckpt" not in checkpoints  # nothing more written to a full disk
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("final.")]

    monkeypatch.undo()  # space freed: the same command writes final/ of step 5
    run(compose([*args, "trainer.max_steps=5", "ckpt_path=last"]), tmp_path)
    assert json.loads((final / "modalforge.json").read_text())["global_step"] == 5
    assert (final / "model.safetensors").stat().st_size > 0
