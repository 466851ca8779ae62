"""One ``train`` per run directory: a second one refuses, naming the first; a dead one leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import FAST, run_cli, script
from modalforge import run_lock
from modalforge.errors import RunDirError
from modalforge.rundir import check_run_dir

_HOLDER = """
import sys, time
from modalforge import run_lock
with run_lock.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _start_holder(run_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK")}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_dir_is_refused_naming_pid_and_host_and_a_killed_holder_leaves_no_stale_lock(tmp_path: Path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(RunDirError) as err:
            check_run_dir(tmp_path, None)
        assert f"process {holder.pid} on host {socket.gethostname()}" in str(err.value)
        assert str(err.value).startswith(f"run_dir={tmp_path}: is in use")
        with pytest.raises(RunDirError), run_lock.hold(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / run_lock.LOCK_NAME).exists()  # the file stays; the kernel dropped the flock
    check_run_dir(tmp_path, None)
    with run_lock.hold(tmp_path):
        check_run_dir(tmp_path, None)  # our own lock: re-entrant within the process
        with run_lock.hold(tmp_path):
            pass
    with run_lock.hold(tmp_path):  # released at the end of the block: taken again
        pass


def test_ranks_other_than_zero_take_no_lock():
    assert run_lock.is_rank_zero({})
    assert not run_lock.is_rank_zero({"LOCAL_RANK": "1"})  # Lightning's launcher re-runs train with LOCAL_RANK
    assert not run_lock.is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "1"})
    assert not run_lock.is_rank_zero({"RANK": "3", "LOCAL_RANK": "0"})  # torchrun
    assert run_lock.is_rank_zero({"RANK": "0", "LOCAL_RANK": "0"})
    assert not run_lock.is_rank_zero({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"})
    assert run_lock.is_rank_zero({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"})


@pytest.mark.slow
def test_two_train_processes_into_one_run_dir(tmp_path: Path):
    """The second ``train`` exits 2 with one line naming the first; after the first is killed a run goes ahead."""
    run_dir = tmp_path / "run"
    args = ["plugin=causal_lm", *FAST, "trainer.limit_val_batches=0", "trainer.val_check_interval=null",
            "checkpoint.export_on_end=false", f"run_dir={run_dir}"]
    first = subprocess.Popen([script("train"), *args, "trainer.max_steps=100000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        lock = run_dir / run_lock.LOCK_NAME
        deadline = time.time() + 120
        while not (lock.exists() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = run_cli("train", *args, "trainer.max_steps=2", check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(
            f"error: run_dir={run_dir}: is in use by another train run: process {first.pid} on host "
            f"{socket.gethostname()} (started "), second.stderr
        assert "Traceback" not in second.stderr
        assert not (run_dir / ".hydra" / "attempt_1").exists(), "the refused run wrote into the run directory"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_cli("train", *args, "trainer.max_steps=2", "overwrite=true")
    assert "in use" not in third.stderr


# ---- the cache (MODALFORGE_CACHE): two fillers at once leave whole files only -------------------------
def _fill(folder: str, tag: str, start) -> None:  # noqa: ANN001 - a multiprocessing Event
    from modalforge.data.cache import ensure_built, write_atomic

    start.wait()

    def build(tmp: Path) -> None:
        with (tmp / "data.txt").open("w") as handle:
            for i in range(200):  # slow and in pieces: a torn copy would show
                handle.write(f"{tag} {i:04d}\n")
                handle.flush()
                time.sleep(0.001)

    ensure_built(Path(folder) / "artefact", build)
    for _ in range(20):
        write_atomic(Path(folder) / "table.bin", lambda tmp: tmp.write_bytes(tag.encode() * 200_000))


def test_two_cache_fillers_at_once_leave_whole_files(tmp_path: Path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), tag, start)) for tag in ("a", "b")]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    lines = (tmp_path / "artefact" / "data.txt").read_text().splitlines()
    assert len(lines) == 200 and len({line.split()[0] for line in lines}) == 1, "a torn or mixed artefact"
    table = (tmp_path / "table.bin").read_bytes()
    assert table in (b"a" * 200_000, b"b" * 200_000), "a torn table"
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["artefact", "artefact.lock", "table.bin"], leftovers
