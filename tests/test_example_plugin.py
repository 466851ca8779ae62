"""A real third-party plugin: pip-installed, discovered, trained by `train plugin=sine`, then uninstalled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import FAST, run_cli, series

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "modalforge-sine"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sine_installed():
    _pip("install", "--no-deps", str(EXAMPLE))
    try:
        yield
    finally:
        _pip("uninstall", "-y", "modalforge-sine")
        proc = run_cli("train", "plugin=sine", check=False)
        assert proc.returncode != 0 and "unknown plugin 'sine'" in proc.stderr, "uninstalled plugin still found"


def test_installed_plugin_is_listed_and_trains(sine_installed, tmp_path):
    listing = run_cli("modalforge", "plugins").stdout
    line = next(l for l in listing.splitlines() if l.startswith("sine"))
    assert "timeseries" in line and "modalforge-sine 0.1.0" in line
    run_dir = tmp_path / "run"
    run_cli("train", "plugin=sine", *FAST, "trainer.max_steps=60", "trainer.val_check_interval=30",
            f"run_dir={run_dir}")
    val = series(run_dir, "val/loss")
    assert len(val) == 2 and val[max(val)] < val[min(val)]
    assert "val/mae" in (run_dir / "csv" / "metrics.csv").read_text()
    assert (run_dir / "final" / "model.safetensors").exists()


def test_installed_plugin_passes_its_own_conformance_tests(sine_installed):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, timeout=600, cwd=EXAMPLE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout
