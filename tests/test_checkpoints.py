"""Checkpoints are written atomically: a failure mid-write leaves the previous one loadable."""

from __future__ import annotations

import pytest
import torch
from fsspec.implementations.local import LocalFileOpener

from modalforge.config import compose
from modalforge.errors import RunDirError
from modalforge.run import resolve_ckpt_path, run

from cli_helpers import FAST


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = compose(["plugin=causal_lm", *FAST, "trainer.max_steps=3", "trainer.limit_val_batches=0",
                   "checkpoint.export_on_end=false", "callbacks=none", "logger=none"])
    trainer, module, _ = run(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3

    original_write = LocalFileOpener.write

    def disk_full(self, data):  # half the bytes reach the disk, then the write fails
        original_write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LocalFileOpener, "write", disk_full)
    trainer.fit_loop.epoch_loop._batches_that_stepped = 99  # a different checkpoint would be written
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(str(last))
    monkeypatch.undo()
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 3 and "state_dict" in state
    assert not [p for p in last.parent.iterdir() if p.name != "last.ckpt"], "temporary files left behind"


def test_ckpt_path_resolution(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(RunDirError, match="nothing to resume"):  # never a silent fresh start
        resolve_ckpt_path("last", tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", tmp_path).endswith("last.ckpt")
    assert resolve_ckpt_path(str(tmp_path), tmp_path / "other").endswith("last.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


def test_the_step_checkpoint_keeps_model_checkpoints_state_key_and_computes_it_once(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from modalforge.callbacks.step_checkpoint import StepCheckpoint

    settings = dict(dirpath=tmp_path, every_n_train_steps=7, save_last=True)
    ours, theirs = StepCheckpoint(**settings), ModelCheckpoint(**settings)
    expected = theirs.state_key
    assert ours.state_key == expected  # checkpoints of either class restore the callback's state
    calls = []
    monkeypatch.setattr(ModelCheckpoint, "_generate_state_key", lambda self, **kw: calls.append(kw) or "k")
    assert [ours.state_key for _ in range(3)] == [expected] * 3 and calls == []  # cached: never rebuilt
