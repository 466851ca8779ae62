"""The conformance check under several processes: a plugin trains sharded as it trains alone.

``assert_plugin_conforms_sharded("myplugin", tmp_path)`` runs the plugin's ``train``
three ways in subprocesses (several processes need a launcher, which a test process
cannot be): ``trainer.devices=2`` under ``strategy=fsdp`` (or ``ddp``) with batch
``b`` per rank, one process with batch ``2b`` (the same global batch, the same
records: the sampler deals the shuffled order out rank by rank), and the sharded run
again, stopped halfway and resumed with ``ckpt_path=last``. It asserts:

- every step's logged ``train/loss`` matches the one-process run (``tolerance``, fp32),
  unless the plugin draws per-rank randomness (``equal_to_single=False``: noise,
  masking, sampling differ by rank, as they must);
- trainable parameters changed and frozen ones did not (the checkpoint against the
  seeded initial build);
- the resumed run ends on the same weights as the uninterrupted one (1e-6), and a
  one-process resume of the sharded checkpoint (2 -> 1) continues with the same losses.

The learning-rate schedule is held constant so that a run stopped halfway follows
the same schedule as the whole one.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

#: Settings that make the runs short and comparable (no validation, samples or export; a constant LR).
SHARDED_FAST_OVERRIDES = (
    "trainer.accelerator=cpu",
    "trainer.val_check_interval=null",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "module.num_samples=0",
    "checkpoint.export_on_end=false",
    "optim.scheduler=constant",
    "optim.warmup_steps=0",
)


@dataclass
class ShardedReport:
    """What the sharded runs did, for further asserts."""

    sharded_losses: dict[int, float]
    single_losses: dict[int, float]
    changed: list[str] = field(default_factory=list)
    frozen_changed: list[str] = field(default_factory=list)
    unchanged_trainable: list[str] = field(default_factory=list)
    resume_difference: float | None = None


def _train(args: Sequence[str], timeout: int) -> None:
    train = str(Path(sys.executable).parent / "train")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([train, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"train {' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                             f"STDERR:\n{proc.stderr[-5000:]}")


def _losses(run_dir: Path) -> dict[int, float]:
    files = [run_dir / "csv" / "metrics.csv", *sorted((run_dir / "csv").glob("resumed_*/metrics.csv"))]
    out: dict[int, float] = {}
    for path in files:
        if path.exists():
            with path.open() as handle:
                out.update({int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(handle)
                            if r.get("train/loss")})
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from modalforge.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(str(run_dir / "checkpoints" / "last.ckpt"))
    return {k: v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}


def _initial(name: str, overrides: Sequence[str]) -> dict[str, tuple[bool, torch.Tensor]]:
    from modalforge.testing import build_configured, compose_plugin

    cfg = compose_plugin(name, [*SHARDED_FAST_OVERRIDES, "trainer.devices=1", *overrides])
    _, module = build_configured(cfg)
    # keep_vars: tied weights (an lm_head sharing the embedding) appear under both names as one Parameter;
    # buffers (running statistics) may change either way and are not checked
    return {k: (v.requires_grad, v.detach().clone()) for k, v in module.state_dict(keep_vars=True).items()
            if isinstance(v, torch.nn.Parameter)}


def _compare_losses(got: dict[int, float], want: dict[int, float], tolerance: float, what: str) -> None:
    assert want, f"the {what} reference logged no train/loss"
    common = sorted(set(got) & set(want))
    assert common == sorted(want), f"{what}: steps {sorted(want)} logged, the sharded run logged {sorted(got)}"
    worst = max(common, key=lambda s: abs(got[s] - want[s]) / max(1.0, abs(want[s])))
    gap = abs(got[worst] - want[worst]) / max(1.0, abs(want[worst]))
    assert gap <= tolerance, f"{what}: train/loss at step {worst} is {got[worst]:.8f}, reference {want[worst]:.8f}"


def assert_plugin_conforms_sharded(name: str, tmp_path: str | Path, overrides: Sequence[str] = (), *,
                                   strategy: str = "fsdp", devices: int = 2, batch_size: int | None = 2, steps: int = 4,
                                   equal_to_single: bool = True, tolerance: float = 1e-4, resume: bool = True,
                                   samples: bool = False, timeout: int = 600) -> ShardedReport:
    """Train plugin ``name`` on ``devices`` CPU processes under ``strategy`` and check it against one process.

    ``samples=True`` validates the sharded run once at its end, with one sample: every rank must take
    part in the collectives of validation, sampling and image logging, or the run hangs.
    ``batch_size`` is ``data.batch_size`` per rank (``None``: the plugin's own, for plugins whose
    batch size lives elsewhere); ``equal_to_single=False`` for plugins that draw per-rank randomness.
    """
    tmp_path = Path(tmp_path)
    base = [f"plugin={name}", *SHARDED_FAST_OVERRIDES, *overrides]
    per_rank = [] if batch_size is None else [f"data.batch_size={batch_size}"]
    sharded = [*base, f"strategy={strategy}", "strategy.timeout=300", f"trainer.devices={devices}", *per_rank]
    if samples:  # one validation at the end (the run is shorter than val_check_interval), one sample
        drop = ("trainer.limit_val_batches=", "module.num_samples=", "trainer.val_check_interval=")
        sharded = [o for o in sharded if not o.startswith(drop)] + ["trainer.limit_val_batches=1",
                                                                  "module.num_samples=1"]
    single = [*base, "trainer.devices=1", *([] if batch_size is None else [f"data.batch_size={batch_size * devices}"])]
    if batch_size is None and equal_to_single:
        raise ValueError("equal_to_single needs batch_size: the one-process run takes devices x batch_size")
    _train([*sharded, f"trainer.max_steps={steps}", f"run_dir={tmp_path / 'sharded'}"], timeout)
    report = ShardedReport(_losses(tmp_path / "sharded"), {})
    assert len(report.sharded_losses) == steps, f"the sharded run logged {report.sharded_losses}"
    assert all(torch.isfinite(torch.tensor(v)) for v in report.sharded_losses.values()), report.sharded_losses
    if equal_to_single:
        _train([*single, f"trainer.max_steps={steps}", f"run_dir={tmp_path / 'single'}"], timeout)
        report.single_losses = _losses(tmp_path / "single")
        _compare_losses(report.sharded_losses, report.single_losses, tolerance, "one process, same global batch")

    final, initial = _weights(tmp_path / "sharded"), _initial(name, overrides)
    for key, value in final.items():
        if key not in initial:
            continue
        trainable, start = initial[key]
        moved = not torch.equal(start.to(value.dtype), value)
        if trainable:
            (report.changed if moved else report.unchanged_trainable).append(key)
        elif moved and value.is_floating_point():
            report.frozen_changed.append(key)
    assert report.changed, "no trainable parameter changed under sharding"
    assert not report.unchanged_trainable, f"trainable parameters that never changed: {report.unchanged_trainable[:8]}"
    assert not report.frozen_changed, f"frozen parameters changed: {report.frozen_changed[:8]}"

    if resume:
        half, resumed, fewer = steps // 2, tmp_path / "resumed", tmp_path / "fewer"
        _train([*sharded, f"trainer.max_steps={half}", f"run_dir={resumed}"], timeout)
        (fewer / "checkpoints").mkdir(parents=True)
        shutil.copy2(resumed / "checkpoints" / "last.ckpt", fewer / "checkpoints" / "last.ckpt")
        _train([*sharded, f"trainer.max_steps={steps}", f"run_dir={resumed}", "ckpt_path=last"], timeout)
        again = _weights(resumed)
        report.resume_difference = max(float((again[k].double() - final[k].double()).abs().max()) for k in final
                                        if final[k].is_floating_point())
        assert report.resume_difference <= 1e-6, (
            f"resuming at step {half} ends {report.resume_difference:.2e} away from the uninterrupted run")
        _compare_losses(_losses(resumed), report.sharded_losses, 1e-6, "the resumed sharded run")
        if equal_to_single:  # 2 -> 1: the half-way sharded checkpoint resumed by one process
            _train([*single, f"trainer.max_steps={steps}", f"run_dir={fewer}", "ckpt_path=last"], timeout)
            later = {s: v for s, v in report.sharded_losses.items() if s >= half}
            got = {s: v for s, v in _losses(fewer).items() if s >= half}
            _compare_losses(got, later, tolerance, f"{devices} -> 1 process resume")
    return report
