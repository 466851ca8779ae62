"""One ``train`` at a time per run directory: an ``flock`` on ``<run_dir>/run.lock``.

Two runs writing the same checkpoints, metrics and ``final/`` would corrupt each
other silently. The first run holds an exclusive ``flock`` on the lock file for as
long as it trains; a second one finds it held and refuses with one line naming the
first's process id and host (written into the file). The kernel drops an
``flock`` when its process dies, even by ``kill -9``, so a crashed run never leaves
a stale lock: the file may stay behind, but nobody holds it.

Only the job's rank zero takes the lock: ranks that Lightning's launcher re-runs
(``LOCAL_RANK`` set) or that torchrun/srun start (``RANK``/``SLURM_PROCID``) belong
to the run that rank zero already locked for all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Mapping

from modalforge.errors import RunDirError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not guarded there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "run.lock"
#: Lock files this process holds: path -> open descriptor (a second open() would conflict with our own flock).
_HELD: dict[str, int] = {}


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "0") or 0)
    except ValueError:
        return 0


def is_rank_zero(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is the job's first (torchrun ``RANK``, srun ``SLURM_PROCID``, Lightning ``LOCAL_RANK``)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return _int(env, "RANK") == 0
    if _int(env, "SLURM_NTASKS") > 1 and "SLURM_PROCID" in env:
        return _int(env, "SLURM_PROCID") == 0
    return _int(env, "LOCAL_RANK") == 0 and _int(env, "NODE_RANK") == 0


def _path(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser().resolve() / LOCK_NAME


def _holder(path: Path) -> str:
    info: dict = {}
    for _ in range(20):  # the holder writes its pid just after taking the lock
        try:
            info = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if info:
            break
        time.sleep(0.05)
    pid, host, started = info.get("pid", "?"), info.get("host", "?"), info.get("started")
    return f"process {pid} on host {host}" + (f" (started {started})" if started else "")


def _busy(run_dir: str | Path, path: Path) -> RunDirError:
    return RunDirError(f"is in use by another train run: {_holder(path)}", where=f"run_dir={Path(run_dir)}",
                       hint="wait for that run to end (then ckpt_path=last continues it), or choose another run_dir=...")


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding ``path``'s flock, or None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def check_free(run_dir: str | Path) -> None:
    """Raise ``RunDirError`` naming the holder if another process trains into ``run_dir`` now."""
    path = _path(run_dir)
    if fcntl is None or not is_rank_zero() or str(path) in _HELD or not path.exists():
        return
    fd = _try_lock(path)
    if fd is None:
        raise _busy(run_dir, path)
    os.close(fd)  # closing the descriptor drops the probe's flock


@contextlib.contextmanager
def hold(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs (rank zero only; re-entrant within a process)."""
    path = _path(run_dir)
    if fcntl is None or not is_rank_zero() or str(path) in _HELD:
        yield
        return
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    fd = _try_lock(path)
    if fd is None:
        raise _busy(run_dir, path)
    _HELD[str(path)] = fd
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield
    finally:
        del _HELD[str(path)]
        if created and os.listdir(path.parent) == [LOCK_NAME]:
            path.unlink()  # a run that stopped before writing anything leaves no folder behind
        os.close(fd)
        for folder in created:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break
