"""Generate-once files in the modalforge cache (synthetic demo data, trained tokenizers, warm starts).

Several processes (DDP ranks, dataloader workers, two runs) may ask for the same
artefact at once; a file lock makes one of them build it, into a temporary folder
of its own that is renamed into place, so nobody ever reads a half-written file.
The temporary names are unique per process, so even where the lock cannot work
(a filesystem without ``flock``) two builders never write into the same folder,
and a rename only ever puts a whole artefact in place.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable

from filelock import FileLock


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder (``~/.cache/modalforge`` unless configured), created if missing."""
    root = Path(cache_dir or "~/.cache/modalforge").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _tmp_name(path: Path, suffix: str) -> Path:
    """A sibling of ``path`` no other process uses: same filesystem, so the final rename is atomic."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}")


def ensure_built(path: str | Path, build: Callable[[Path], None]) -> Path:
    """Return ``path``, first calling ``build(tmp_dir)`` and renaming ``tmp_dir`` to it if absent."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():
            return path
        for stale in path.parent.glob(f"{path.name}.*.building"):  # left by a builder that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = _tmp_name(path, "building")
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            tmp.rename(path)  # atomic; fails if another builder got there first (then its copy stands)
        except OSError:
            if not path.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_file)`` and move the file to ``path`` with ``os.replace``: readers see all of it or none."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
