"""What a run directory holds, and the rule that a finished run is never overwritten.

A run directory is *finished* once training ended and ``final/`` was written
(marked by ``finished.json``; a ``final/`` folder from before the marker counts
too). A fresh run (no ``ckpt_path``) into a directory that holds a finished run
or checkpoints is refused, naming the folder and the three ways on:
``ckpt_path=last`` (continue it), another ``run_dir``, or ``overwrite=true``.
``ckpt_path=last`` where there is nothing to resume is an error, never a silent
fresh start.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from modalforge import run_lock
from modalforge.errors import RunDirError

FINISHED_MARKER = "finished.json"


def is_finished(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / FINISHED_MARKER).exists() or (run_dir / "final").is_dir()


def has_checkpoints(run_dir: str | Path) -> bool:
    folder = Path(run_dir) / "checkpoints"
    return folder.is_dir() and any(folder.glob("*.ckpt"))


def mark_finished(run_dir: str | Path, step: int) -> None:
    """Write ``finished.json`` atomically (step and time)."""
    run_dir = Path(run_dir)
    tmp = run_dir / (FINISHED_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": int(step), "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    tmp.replace(run_dir / FINISHED_MARKER)


def check_run_dir(run_dir: str | Path, ckpt_path: str | None, overwrite: bool = False) -> None:
    """Refuse a run into a directory another ``train`` uses now, a fresh run over an earlier one,
    and a resume with nothing to resume.

    With ``overwrite=True`` the earlier run's checkpoints, ``final/`` and marker are removed first.
    """
    run_dir = Path(run_dir)
    run_lock.check_free(run_dir)  # another train in this run_dir now: say so, not "holds checkpoints"
    fresh = ckpt_path in (None, "", "null")
    if ckpt_path == "last" and not has_checkpoints(run_dir):
        where = run_dir / "checkpoints"
        reason = "does not exist" if not run_dir.exists() else "holds no .ckpt file"
        raise RunDirError(f"ckpt_path=last but {where} {reason}: nothing to resume",
                          where=f"run_dir={run_dir}",
                          hint="check run_dir (the folder of the run to continue), or drop ckpt_path=last to start afresh")
    if not fresh:
        return
    finished, checkpoints = is_finished(run_dir), has_checkpoints(run_dir)
    if not (finished or checkpoints):
        return
    if overwrite:
        for name in ("checkpoints", "final"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        (run_dir / FINISHED_MARKER).unlink(missing_ok=True)
        return
    what = "a finished run (final/ is there)" if finished else "checkpoints of an earlier run"
    raise RunDirError(f"holds {what}; a fresh run would overwrite it", where=f"run_dir={run_dir}",
                      hint="continue it with ckpt_path=last, choose another run_dir=..., "
                           "or replace it with overwrite=true")


def attempt_subdir(run_dir: str | Path) -> str | None:
    """Where Hydra should write this attempt's ``.hydra/`` so an earlier attempt's config survives."""
    hydra_dir = Path(run_dir) / ".hydra"
    if not (hydra_dir / "config.yaml").exists():
        return None
    n = 1
    while (hydra_dir / f"attempt_{n}").exists():
        n += 1
    return f".hydra/attempt_{n}"
