"""Running the real console scripts in subprocesses, as a user would."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

FAST = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "module.num_samples=0",
]


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_cli(name: str, *args: str, check: bool = True, timeout: int = 600, env: dict | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([script(name), *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """Rows of csv/metrics.csv, then of each resumed run's csv/resumed_N/metrics.csv."""
    files = [run_dir / "csv" / "metrics.csv"] + sorted((run_dir / "csv").glob("resumed_*/metrics.csv"))
    rows = []
    for path in files:
        if path.exists():
            with path.open() as handle:
                rows += list(csv.DictReader(handle))
    return rows


def series(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of one logged metric."""
    return {int(r["step"]): float(r[key]) for r in metric_rows(run_dir) if r.get(key)}
