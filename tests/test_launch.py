"""Several processes: torchrun / SLURM environments, one run_dir for all ranks, and a rank that dies or hangs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from cli_helpers import run_cli, script, series
from modalforge import cli
from modalforge.config import compose
from modalforge.errors import ConfigError, distributed_failure
from modalforge.scale import launch

LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "RANK", "LOCAL_RANK", "GROUP_RANK",
                 "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment; ``env(**vars)`` sets a fake torchrun or SLURM one."""
    for key in [*LAUNCHER_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(key, raising=False)

    def set_vars(**values: object) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))

    return set_vars


def _torchrun(env, rank: int = 0, nodes: int = 2, per_node: int = 1, **more: object) -> None:
    env(TORCHELASTIC_RUN_ID="none", RANK=rank, LOCAL_RANK=rank % per_node, GROUP_RANK=rank // per_node,
        WORLD_SIZE=nodes * per_node, LOCAL_WORLD_SIZE=per_node, **more)


def _slurm(env, **more: object) -> None:
    env(SLURM_NTASKS=8, SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=4, SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NODEID=1,
        SLURM_JOB_ID=4242, SLURM_JOB_NAME="pretrain", **more)


def test_torchrun_and_slurm_are_detected_like_lightning_does(env):
    assert launch.detect() is None and launch.is_rank_zero()
    _torchrun(env, rank=3, nodes=2, per_node=2)
    assert launch.detect() == launch.Launcher("torchrun", 4, 2, 2, 3)
    assert not launch.is_rank_zero()


def test_slurm_srun_is_detected_and_lightning_accepts_the_trainer_it_yields(env):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    _slurm(env)
    found = launch.detect()
    assert found == launch.Launcher("slurm", 8, 2, 4, 5, "4242")
    extra = launch.fit_trainer(compose(["plugin=causal_lm"]), [], found)
    assert extra == ["trainer.num_nodes=2", "trainer.devices=4"]
    SLURMEnvironment().validate_settings(num_devices=4, num_nodes=2)  # Lightning's own check passes
    env(SLURM_JOB_NAME="interactive")  # salloc + a shell: not a launcher, as in Lightning
    assert launch.detect() is None


def test_slurm_ranks_share_one_run_dir_named_by_the_job(env):
    _slurm(env)
    found = launch.detect()
    assert launch.agree_run_dir(compose(["plugin=causal_lm"]), found) == "outputs/causal_lm/job-4242"
    assert launch.agree_run_dir(compose(["plugin=causal_lm", "run_dir=/shared/a"]), found) is None


@pytest.mark.parametrize("override, key", [("trainer.num_nodes=3", "trainer.num_nodes"),
                                           ("trainer.num_nodes=1", "trainer.num_nodes"),
                                           ("trainer.devices=2", "trainer.devices")])
def test_a_trainer_setting_against_the_launcher_is_an_error_naming_it(env, override, key):
    _slurm(env)
    with pytest.raises(ConfigError) as info:
        launch.fit_trainer(compose(["plugin=causal_lm", override]), [override], launch.detect())
    assert info.value.where == key and "slurm started 2 node(s) x 4 task(s)" in str(info.value)


def test_the_cli_prints_the_mismatch_as_one_line(env, capsys, tmp_path):
    _torchrun(env, rank=0, nodes=2)
    with pytest.raises(SystemExit) as info:
        cli.train(["plugin=causal_lm", "trainer.num_nodes=3", f"run_dir={tmp_path / 'run'}"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2] == "error: trainer.num_nodes: is 3 but torchrun started 2 node(s) x 1 process(es)"
    assert lines[-1].startswith("hint: drop trainer.num_nodes")
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_ranks_take_rank_zeros_run_dir_from_the_agents_store(env):
    port = _free_port()
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10),
                                       wait_for_workers=False)  # what torchrun's agent on node 0 serves
    common = dict(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    _torchrun(env, rank=0, **common)
    zero = launch.agree_run_dir(compose(["plugin=causal_lm", "run_dir=/shared/zero"]), launch.detect())
    _torchrun(env, rank=1, **common)
    one = launch.agree_run_dir(compose(["plugin=causal_lm", "run_dir=/shared/one"]), launch.detect())
    assert zero == one == "/shared/zero"
    del store


def test_without_a_shared_store_a_time_stamped_run_dir_is_refused(env):
    _torchrun(env, rank=1, TORCHELASTIC_USE_AGENT_STORE="False")
    with pytest.raises(ConfigError, match="resolves differently on each node") as info:
        launch.agree_run_dir(compose(["plugin=causal_lm"]), launch.detect())
    assert info.value.where == "run_dir" and "same run_dir" in info.value.hint
    assert launch.agree_run_dir(compose(["plugin=causal_lm", "run_dir=/shared/a"]), launch.detect()) is None


def test_only_rank_zero_writes_hydra_files(env):
    assert launch.rank_hydra_overrides(["plugin=causal_lm"]) == []
    _torchrun(env, rank=1)
    assert launch.rank_hydra_overrides(["plugin=causal_lm"]) == ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def test_children_of_lightnings_launcher_write_no_log_file(env):
    env(LOCAL_RANK=1)  # Lightning's launcher passes hydra.output_subdir=null itself
    assert launch.rank_hydra_overrides(["plugin=causal_lm", "hydra.output_subdir=null"]) == ["hydra/job_logging=stdout"]


def test_gloo_errors_about_another_rank_are_recognised():
    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:5523. This is typically caused by a remote worker crashing.")
    wrapped = ValueError("while saving")
    wrapped.__context__ = gone
    assert distributed_failure(wrapped) == ("the connection to another rank broke: it died or its node is gone "
                                            "(RuntimeError: Connection closed by peer [127.0.0.1]:5523)")
    hung = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms "
                        "for recv operation to complete")
    assert distributed_failure(hung).startswith("a collective timed out (strategy.timeout)")
    assert distributed_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_dead_child_is_named_and_a_live_one_stopped(monkeypatch):
    dead = subprocess.Popen(["sleep", "30"])
    alive = subprocess.Popen(["sleep", "30"])
    monkeypatch.setattr(launch, "_CHILDREN", [alive, dead])
    monkeypatch.setattr(launch, "_REPORTED", [])
    assert launch.child_failure() is None
    dead.kill()
    assert launch.child_failure(wait_s=5) == f"local rank 2 (PID {dead.pid}) was killed by SIGKILL"
    launch.stop_children()
    assert alive.wait(timeout=5) == -signal.SIGKILL and launch._REPORTED


def test_the_observer_waits_for_the_main_process_then_says_one_line(monkeypatch, capsys):
    from lightning.fabric.strategies.launchers import subprocess_script

    monkeypatch.setattr(subprocess_script, "_ChildProcessObserver", subprocess_script._ChildProcessObserver)
    monkeypatch.setattr(launch, "_CHILDREN", [])
    monkeypatch.setattr(launch, "_REPORTED", [])
    monkeypatch.setattr(launch, "CHILD_FAILURE_GRACE_S", 1.0)
    launch.watch_children()
    main, dead = subprocess.Popen(["sleep", "30"]), subprocess.Popen(["sleep", "30"])  # a stuck main process
    dead.kill()
    dead.wait()
    observer = subprocess_script._ChildProcessObserver(main.pid, [dead])  # what Lightning's launcher makes
    assert observer._run()  # it saw the dead child: waited the grace, then killed the main process
    assert main.wait(timeout=5) == -signal.SIGKILL
    assert capsys.readouterr().err.strip() == (f"error: rank 0: local rank 1 (PID {dead.pid}) was killed by SIGKILL "
                                               "and this process did not stop within 1 s")


# ---- on real processes ----------------------------------------------------------------------------------------------

TINY_DDP = ["plugin=causal_lm", "strategy=ddp", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
            "trainer.enable_progress_bar=false", "module.num_samples=0", "trainer.limit_val_batches=0",
            "trainer.val_check_interval=null", "trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_share_one_run_dir(tmp_path):
    """Two ``torchrun --nnodes=2`` commands, as on two machines, whose run_dir resolves differently on each."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        command = [script("torchrun"), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
                   "--master-addr=127.0.0.1", f"--master-port={port}", script("train"), *TINY_DDP,
                   "trainer.max_steps=3", "data.token_cache=off",  # every rank tokenises, and says so
                   "run_dir=outputs/${now:%H-%M-%S-%f}"]  # like the default's ${now:...}, with microseconds
        procs.append(subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}))
    outs = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    (run_dir,) = (tmp_path / "outputs").iterdir()  # one run directory, not one per node
    assert (run_dir / "final" / "model.safetensors").exists() and len(series(run_dir, "train/loss")) == 3
    assert (outs[0] + outs[1]).count("[modalforge] exported to") == 1  # final/ written once, by rank zero
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.num_nodes=2" in overrides and "trainer.devices=1" in overrides
    assert "job_logging=stdout" not in (run_dir / ".hydra" / "hydra.yaml").read_text()  # rank zero's
    assert "data.train: tokenising: done in" in outs[1]  # rank 1 logs, to its console only
    assert (run_dir / "cli.log").read_text().count("data.train: tokenising: done in") == 1
    assert not list(run_dir.glob(".hydra/attempt_*"))


def _child_pids(pid: int, count: int, timeout: float = 120) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
        if len(kids) >= count:
            return kids
        time.sleep(0.2)
    raise AssertionError(f"process {pid} started no child process in {timeout} s")


def _start_two(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([script("train"), *TINY_DDP, "trainer.devices=2", "trainer.max_steps=100000",
                             "checkpoint.every_n_train_steps=100000", f"run_dir={run_dir}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(series(run_dir, "train/loss")
                                                                 if (run_dir / "csv").exists() else {}) < steps:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]


def _two_past_step_two(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """A 2-process run (launcher, and its one child's PID) once it has logged two steps."""
    proc = _start_two(run_dir, *extra)
    (child,) = _child_pids(proc.pid, 1)
    _wait_for_steps(run_dir, proc, 2)
    return proc, child


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _last_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.strip()][-2:]


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    proc, child = _two_past_step_two(run_dir)
    os.kill(child, signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 2, err[-3000:]
    assert time.time() - killed < 5 + launch.CHILD_FAILURE_GRACE_S
    error, hint = _last_lines(err)
    assert error.startswith(f"error: rank 0: local rank 1 (PID {child}) was killed by SIGKILL; "
                            "the connection to another rank broke"), err[-3000:]
    assert hint.startswith("hint: the same command plus ckpt_path=last") and "Traceback" not in err


@pytest.mark.slow
def test_a_hung_rank_ends_the_run_after_strategy_timeout(tmp_path):
    run_dir = tmp_path / "run"
    proc, child = _two_past_step_two(run_dir, "strategy.timeout=15")  # also bounds the start: the child joins within it
    os.kill(child, signal.SIGSTOP)
    stopped = time.time()
    _, err = proc.communicate(timeout=120)
    took = time.time() - stopped
    time.sleep(1)
    left = _running(child)
    if left:
        os.kill(child, signal.SIGKILL)
    assert not left, "the stopped child outlived the run"
    assert proc.returncode == 2, err[-3000:]
    assert 15 <= took < 90, took
    error, _ = _last_lines(err)
    assert error.startswith("error: rank 0: a collective timed out (strategy.timeout)"), err[-3000:]
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_both_ranks_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start_two(run_dir)
    children = _child_pids(proc.pid, 1)
    _wait_for_steps(run_dir, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and err.count("stopped by SIGTERM") == 1
    assert not any(_running(pid) for pid in children)  # Lightning passed SIGTERM on to its child, which ended too
    step = torch.load(run_dir / "checkpoints" / "last-interrupted.ckpt", map_location="cpu",
                      weights_only=False)["global_step"]
    assert step >= 2
    run_cli("train", *TINY_DDP, "trainer.devices=2", f"trainer.max_steps={step + 2}", f"run_dir={run_dir}",
            "ckpt_path=last")
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == step + 2
    assert {step, step + 1} <= set(series(run_dir, "train/loss"))


@pytest.mark.slow
def test_sigterm_to_one_child_rank_stops_both_ranks_at_the_same_step(tmp_path):
    """A signal that reaches one rank alone: that rank may not stop by itself (the others would wait in a collective)."""
    run_dir = tmp_path / "run"
    proc, child = _two_past_step_two(run_dir)
    os.kill(child, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    saved = torch.load(run_dir / "checkpoints" / "last-interrupted.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] >= 2 and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] \
        == saved["global_step"]  # stopped at a batch end, whole


@pytest.mark.parametrize("value", ["outputs/causal_lm/job-4242", r"C:\runs\a b", r"\\share\runs\it's", "/tmp/x y\\"])
def test_the_agreed_run_dir_reads_back_through_hydras_parser_unchanged(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([f"run_dir={launch.override_value(value)}"])
    assert parsed.value() == value


def test_an_override_names_its_key_whatever_its_prefix():
    from modalforge.overrides import Override, override_key

    assert [override_key(o) for o in ("trainer.devices=2", "+strategy.x=1", "++a.b=c=d", "~callbacks.x")] == \
        ["trainer.devices", "strategy.x", "a.b", "callbacks.x"]
    assert Override("++a.b=c=d").value == "c=d" and Override("++a.b=c=d").prefix == "++"
    assert Override("~callbacks.x").value is None and Override("~callbacks.x").prefix == "~"
