"""Several processes of one run: external launchers (torchrun, srun) and Lightning's own.

``train`` reads the launcher's environment *before Hydra starts a job*, because
Hydra creates ``run_dir`` and writes ``.hydra/`` first:

- only rank zero writes ``.hydra/`` and ``cli.log`` (:func:`rank_hydra_overrides`);
- ``trainer.num_nodes`` / ``trainer.devices`` follow the launcher unless the user set
  them, and a contradiction is one line naming the key (:func:`fit_trainer`);
  Lightning would otherwise stop with a ValueError trace;
- all ranks use one ``run_dir`` (:func:`agree_run_dir`): the default has a
  ``${now:...}``, which nodes started seconds apart resolve differently.

With Lightning's launcher (``trainer.devices=N`` started by one ``train``), a child
that dies makes Lightning's observer SIGKILL the main process within 5 s, often
before it could say what happened; :func:`watch_children` gives it time to.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from modalforge.errors import ConfigError
from modalforge.overrides import override_key

#: How long ranks other than zero wait for rank zero's ``run_dir`` (seconds).
RUN_DIR_TIMEOUT_S = 300
#: How long the main process gets to report a dead child and exit before it is killed (seconds).
CHILD_FAILURE_GRACE_S = 30.0

_NOW = re.compile(r"\$\{now:[^}]*\}")


@dataclass(frozen=True)
class Launcher:
    """The processes an external launcher started: ``num_nodes`` x ``devices`` = ``world_size``."""

    name: str  # "torchrun" | "slurm"
    world_size: int
    num_nodes: int
    devices: int  # processes per node
    rank: int
    job_id: str | None = None  # SLURM's, the same on every node

    def describe(self) -> str:
        unit = "process(es)" if self.name == "torchrun" else "task(s)"
        return f"{self.name} started {self.num_nodes} node(s) x {self.devices} {unit}"


def _env_int(key: str, default: int) -> int:
    try:
        return int(os.environ.get(key, ""))
    except ValueError:
        return default


def detect() -> Launcher | None:
    """The external launcher of this process, found as Lightning finds it (TorchElastic first, then SLURM)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        world, local = _env_int("WORLD_SIZE", 1), max(1, _env_int("LOCAL_WORLD_SIZE", 1))
        return Launcher("torchrun", world, max(1, world // local), local, _env_int("RANK", 0))
    if SLURMEnvironment.detect():
        tasks, nodes = _env_int("SLURM_NTASKS", 1), max(1, _env_int("SLURM_NNODES", 1))
        return Launcher("slurm", tasks, nodes, _env_int("SLURM_NTASKS_PER_NODE", max(1, tasks // nodes)),
                        _env_int("SLURM_PROCID", 0), os.environ.get("SLURM_JOB_ID"))
    return None


def process_rank() -> int:
    """This process's rank before Lightning starts: the launcher's, else Lightning's children's (0 when alone)."""
    launcher = detect()
    if launcher is not None:
        return launcher.rank
    return _env_int("NODE_RANK", 0) + _env_int("LOCAL_RANK", 0)  # Lightning's launcher: only zero-or-not matters


def is_rank_zero() -> bool:
    return process_rank() == 0


def _keys(overrides: Sequence[str]) -> set[str]:
    return {override_key(o) for o in overrides if not o.startswith("-")}


def rank_hydra_overrides(argv: Sequence[str]) -> list[str]:
    """Ranks other than zero write no ``.hydra/`` and no ``cli.log``: they log to the console only."""
    if is_rank_zero():
        return []
    keys = _keys(argv)
    return [o for key, o in (("hydra.output_subdir", "hydra.output_subdir=null"),
                             ("hydra/job_logging", "hydra/job_logging=stdout")) if key not in keys]


def _device_count(value: Any) -> int | None:
    """Processes per node a ``trainer.devices`` value asks for; None for ``auto`` / -1 (follow the launcher)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value == -1 else value
    if isinstance(value, str):
        text = value.strip()
        if text in ("auto", "-1"):
            return None
        if "," in text:
            return len([p for p in text.split(",") if p.strip()])
        return int(text) if text.isdigit() else None
    return len(value)  # a list of device indices


def fit_trainer(cfg: Any, overrides: Sequence[str], launcher: Launcher) -> list[str]:
    """Overrides that make ``trainer.num_nodes`` and ``trainer.devices`` match ``launcher``.

    A value the user set (command line or config file) that contradicts the launcher
    raises a :class:`ConfigError` naming the key.
    """
    trainer = cfg.get("trainer") or {}
    extra = []
    nodes = trainer.get("num_nodes", 1)
    if nodes == 1 and "trainer.num_nodes" not in _keys(overrides):
        if launcher.num_nodes != 1:
            extra.append(f"trainer.num_nodes={launcher.num_nodes}")
    elif int(nodes) != launcher.num_nodes:
        raise ConfigError(f"is {nodes} but {launcher.describe()}", where="trainer.num_nodes",
                          hint=f"drop trainer.num_nodes (it follows the launcher) or set it to {launcher.num_nodes}")
    devices = _device_count(trainer.get("devices", "auto"))
    if devices is None:
        extra.append(f"trainer.devices={launcher.devices}")
    elif devices != launcher.devices:
        flag = "--nproc-per-node" if launcher.name == "torchrun" else "--ntasks-per-node"
        raise ConfigError(f"is {trainer.get('devices')} but {launcher.describe()} (one process per device)",
                          where="trainer.devices",
                          hint=f"drop trainer.devices (it follows the launcher) or launch with {flag}={devices}")
    return extra


def override_value(value: str) -> str:
    """``value`` quoted so that Hydra's override parser reads it back unchanged (backslashes stay literal,
    as Hydra's grammar has them: a Windows path or a share reaches every rank as rank zero chose it)."""
    from modalforge.overrides import hydra_value

    return hydra_value(value)


def _raw_run_dir(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.to_container(cfg, resolve=False).get("run_dir"))


def _from_rank_zero(value: str, rank: int) -> str:
    """Rank zero's ``value``, through the store that torchrun's agent serves at ``MASTER_ADDR:MASTER_PORT``."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(seconds=RUN_DIR_TIMEOUT_S), wait_for_workers=False)
    key = f"modalforge/run_dir/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if rank == 0:
        store.set(key, value)
        return value
    return store.get(key).decode()


def agree_run_dir(cfg: Any, launcher: Launcher) -> str | None:
    """The ``run_dir`` every rank uses, or None when each rank's own resolution already agrees.

    torchrun: rank zero's resolved ``run_dir``, handed to the others through the agent's store.
    SLURM: a ``${now:...}`` in ``run_dir`` (the default has one) becomes ``job-<SLURM_JOB_ID>``.
    """
    if launcher.world_size <= 1:
        return None
    raw = _raw_run_dir(cfg)
    if launcher.name == "slurm":
        if not _NOW.search(raw) or not launcher.job_id:
            return None
        copy = cfg.copy()
        copy.run_dir = _NOW.sub(f"job-{launcher.job_id}", raw)
        return str(copy.run_dir)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        if _NOW.search(raw):
            raise ConfigError(f"{raw!r} resolves differently on each node and torchrun shares no store to agree "
                              "on one", where="run_dir", hint="pass the same run_dir=... to every node")
        return None
    try:
        return _from_rank_zero(str(cfg.run_dir), launcher.rank)
    except Exception as err:  # noqa: BLE001 - rank zero never got here (it failed) or its node is unreachable
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"rank {launcher.rank} got no run_dir from rank 0 through torchrun's store at "
                          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({type(err).__name__}: {first})",
                          where="run_dir", hint="see rank 0's output, or pass the same run_dir=... to every node"
                          ) from None


# --- Lightning's own launcher: a child process that dies ------------------------------------------------------------

_CHILDREN: list[Any] = []  # the subprocess.Popen of each child, in local-rank order from 1
_REPORTED: list[bool] = []  # the main process said what happened: the observer need not


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def child_failure(wait_s: float = 0.0) -> str | None:
    """``local rank N (PID p) was killed by SIGKILL`` for the first of Lightning's children that failed, or None.

    Waits up to ``wait_s`` for one to end (a rank that broke the connection is usually dying).
    """
    deadline = time.monotonic() + wait_s
    while True:
        for i, proc in enumerate(_CHILDREN):
            if proc.poll():
                return f"local rank {i + 1} (PID {proc.pid}) {_how(proc.returncode)}"
        if not _CHILDREN or time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def stop_children() -> None:
    """SIGKILL Lightning's children that still run: a hung or stopped one would outlive the run."""
    _REPORTED.append(True)
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.kill()


def watch_children() -> None:
    """Make Lightning's child-process observer leave the main process time to report a dead child.

    Lightning's ``_ChildProcessObserver`` SIGKILLs every process as soon as one child
    ends with a non-zero code. This one kills the other children at once too, then
    waits up to :data:`CHILD_FAILURE_GRACE_S` for the main process to report and exit
    by itself; only if it has not does it print one ``error:`` line and kill it.
    """
    from lightning.fabric.strategies.launchers import subprocess_script

    base = subprocess_script._ChildProcessObserver
    if getattr(base, "_modalforge", False):
        return

    class _Observer(base):  # type: ignore[misc, valid-type]
        _modalforge = True

        def __init__(self, main_pid: int, child_processes: list, sleep_period: int = 5) -> None:
            super().__init__(main_pid, child_processes, sleep_period)
            _CHILDREN[:] = child_processes

        def _terminate_all(self) -> None:
            failed = child_failure()
            for proc in self._child_processes:
                if proc.poll() is None:
                    proc.send_signal(self._termination_signal)
            deadline = time.monotonic() + CHILD_FAILURE_GRACE_S
            while time.monotonic() < deadline and not _REPORTED:
                time.sleep(0.2)
            if _REPORTED:
                return  # the main process reported the failure and is exiting
            sys.stdout.flush()
            print(f"error: rank 0: {failed or 'a child process failed'} and this process did not stop within "
                  f"{CHILD_FAILURE_GRACE_S:.0f} s", file=sys.stderr, flush=True)
            os.kill(self._main_pid, self._termination_signal)

    subprocess_script._ChildProcessObserver = _Observer
