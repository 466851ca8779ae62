"""Generate-once files in the modalforge cache (synthetic demo data, trained tokenizers).

Several processes (DDP ranks, dataloader workers, two runs) may ask for the same
artefact at once; a file lock makes one of them build it, into a temporary folder
that is renamed into place, so nobody ever reads a half-written file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder (``~/.cache/modalforge`` unless configured), created if missing."""
    root = Path(cache_dir or "~/.cache/modalforge").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def ensure_built(path: str | Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, first calling ``build(tmp_dir)`` and renaming ``tmp_dir`` to it if absent."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return path
        tmp = path.with_name(path.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        tmp.rename(path)
    return path
