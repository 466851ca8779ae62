"""Writing a model folder (``final/``, ``modalforge export``) so that a failure never leaves half of one.

The folder is written beside its destination under another name and swapped in by renames, so a
reader (the next run's ``model.name_or_path``, a user's ``from_pretrained``) sees the previous
folder or the new one, whole. A write that fails (a full disk, a quota, permissions) removes its
partial copy and ends in one line saying which of the two is left, instead of an ``OSError``
traceback after hours of training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

from modalforge.errors import ModalforgeError


class Exportable(Protocol):
    def export(self, directory: str | Path, *, merge: bool = False) -> Path: ...


class ModelFolderError(ModalforgeError):
    """A model folder could not be written (full disk, quota, permissions); nothing half-written was left."""


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.exists() else 0.0


def write_model_folder(directory: str | Path, module: Exportable, *, merge: bool, metadata: dict[str, Any],
                       hint: str) -> Path:
    """``module.export`` into ``directory`` plus ``modalforge.json`` (``metadata``), replacing it only when whole.

    Args:
        directory: the destination (``<run_dir>/final``, an export folder).
        module: what writes the weights (``TrainingModule``, or a gathered copy of it).
        merge: merge PEFT adapters into the base weights.
        metadata: written as ``modalforge.json`` beside the weights.
        hint: the caller's next step when the write fails (how to write the folder again).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that died: the run lock says none is running
    try:
        module.export(tmp, merge=merge)
        (tmp / "modalforge.json").write_text(json.dumps(metadata, indent=2, default=str))
    except OSError as err:
        written = _size_mb(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous one is kept" if directory.exists() else "nothing was left there"
        reason = err.strerror or str(err)
        raise ModelFolderError(f"could not be written: {reason} after {written:.1f} MB; the partial copy was "
                               f"removed and {kept}", where=str(directory), hint=hint) from err
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)  # between these two renames (an instant) the folder is absent, never half-written
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory
