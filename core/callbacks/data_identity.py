"""A data file that changed under a resuming run is found, not silently trained on.

The checkpoint's data position (how many batches of which shuffled epoch were consumed)
means something only for the files it was counted on. This callback records each local
file of ``data.train`` / ``data.val`` in the checkpoint (path, size, modification time and
hashes of its first and last 64 KiB) and compares them on resume:

- a file replaced, truncated or rewritten: refused with one line naming it
  (``checkpoint.on_data_change=refuse``, the default), or a warning (``warn``);
- a file that only grew (its recorded bytes unchanged: appended records): a warning, the
  position is kept and the new records join the next epoch's shuffle;
- a file that is gone: as a replaced file.

Hub datasets, streamed shards and synthetic defaults (no local path) are not checked.
Written by hand: Lightning records no identity of the data a checkpoint was taken on.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import lightning as L

from modalforge.data.errors import DataError

#: Bytes hashed at each end of a file (enough to tell a rewritten file from the one recorded).
_EDGE = 64 * 1024
#: Files of a folder source that are recorded (a folder of a million images: the first ones, sorted).
_MAX_FILES = 2000
ON_CHANGE = ("refuse", "warn")


def _hash(path: Path, start: int, length: int) -> str:
    with path.open("rb") as handle:
        handle.seek(start)
        return hashlib.sha256(handle.read(length)).hexdigest()


def identity(path: Path) -> dict[str, Any]:
    """What is recorded of one file."""
    size = path.stat().st_size
    return {"size": size, "mtime_ns": path.stat().st_mtime_ns, "head": _hash(path, 0, min(size, _EDGE)),
            "tail": _hash(path, max(0, size - _EDGE), min(size, _EDGE))}


def _paths(spec: Any) -> Iterable[str]:
    """Every string of a data spec (a path, a list, a mixture's ``{path: ...}``, named val sets)."""
    if isinstance(spec, str):
        yield spec
    elif isinstance(spec, Mapping):
        for value in spec.values():
            yield from _paths(value)
    elif isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig":
        for value in spec:
            yield from _paths(value)
    elif type(spec).__name__ == "DictConfig":
        for value in spec.values():
            yield from _paths(value)


def local_files(specs: Iterable[Any]) -> list[Path]:
    """The local files a data spec names (globs expanded, folders listed), sorted, without duplicates."""
    found: set[Path] = set()
    for text in (t for spec in specs for t in _paths(spec)):
        if "://" in text or text.startswith("hf:"):
            continue
        for match in glob.glob(os.path.expanduser(text)) if any(c in text for c in "*?[") else [text]:
            path = Path(match).expanduser()
            if path.is_file():
                found.add(path.resolve())
            elif path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
                found.update(p.resolve() for p in files[:_MAX_FILES])
    return sorted(found)


def compare(recorded: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """(changed, appended): files whose recorded bytes differ or are gone, and files that only grew."""
    changed, appended = [], []
    for name, old in recorded.items():
        path = Path(name)
        if not path.is_file():
            changed.append(f"{name} (gone)")
            continue
        size = path.stat().st_size
        if size == old["size"] and path.stat().st_mtime_ns == old["mtime_ns"]:
            continue
        start = max(0, old["size"] - _EDGE)
        same_prefix = (size >= old["size"] and _hash(path, 0, min(old["size"], _EDGE)) == old["head"]
                       and _hash(path, start, min(old["size"], _EDGE)) == old["tail"])
        if not same_prefix:
            changed.append(f"{name} ({old['size']} -> {size} bytes)" if size != old["size"] else
                           f"{name} (rewritten)")
        elif size > old["size"]:
            appended.append(f"{name} (+{size - old['size']} bytes)")
    return changed, appended


class DataIdentity(L.Callback):
    """Records the data files in checkpoints; on resume, refuses (or warns about) files that changed."""

    def __init__(self, specs: Iterable[Any], on_change: str = "refuse") -> None:
        if on_change not in ON_CHANGE:
            raise ValueError(f"checkpoint.on_data_change={on_change!r} is not one of {', '.join(ON_CHANGE)}")
        self.specs, self.on_change = list(specs), on_change

    def state_dict(self) -> dict[str, Any]:
        return {"files": {str(p): identity(p) for p in local_files(self.specs)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing: ``run()`` calls :func:`check_resume` before anything is built (a changed file can change
        the model itself, a tokenizer trained on it, and fail the weights' load first, saying less)."""

    @staticmethod
    def state_of(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        """This callback's state in a checkpoint dict, if it has one."""
        return (checkpoint.get("callbacks") or {}).get("DataIdentity")


def check_resume(checkpoint: Mapping[str, Any], on_change: str = "refuse") -> None:
    """Refuse (or warn about) data files that changed since ``checkpoint`` was written; warn about grown ones."""
    state = DataIdentity.state_of(checkpoint)
    changed, appended = compare((state or {}).get("files") or {})
    if appended:
        warnings.warn(f"data grew since the checkpoint: {', '.join(appended[:3])}; the data position is "
                      "kept and the new records join the next epoch's shuffle", stacklevel=2)
    if not changed:
        return
    what = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    if on_change == "warn":
        warnings.warn(f"data changed since the checkpoint: {what}; resuming anyway "
                      "(checkpoint.on_data_change=warn): the data position may point at other records", stacklevel=2)
        return
    raise DataError(f"changed since the checkpoint was written: {what}; the resumed data position would "
                    "point at other records", hint="restore the files, start a fresh run, or resume anyway "
                    "with checkpoint.on_data_change=warn")
