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
  one-process resume of the sharded checkpoint (2 -> 1) continues with the same losses;
- with ``export=True``, the sharded run's ``final/`` was written once, and every tensor in its
  ``*.safetensors`` equals, bit for bit, the trained tensor it comes from (see :func:`check_export`).

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

#: What every conformance run sets, one process or several: CPU, no validation or samples, a
#: loss logged each step, quiet (``modalforge.testing.FAST_OVERRIDES`` adds one device, no loggers
#: and no callbacks; the runs here keep both: the losses come from the CSV logger, the weights from
#: the checkpoint callback). Defined here, not there: modalforge.testing imports this module.
QUICK_OVERRIDES = (
    "trainer.accelerator=cpu",
    "trainer.val_check_interval=null",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "module.num_samples=0",
)

#: ``export=True`` keeps the export these settings turn off.
_NO_EXPORT = "checkpoint.export_on_end=false"

#: Settings that make the runs short and comparable (no validation, samples or export; a constant LR).
SHARDED_FAST_OVERRIDES = (
    *QUICK_OVERRIDES,
    _NO_EXPORT,
    "optim.scheduler=constant",
    "optim.warmup_steps=0",
)

#: What the CLI prints when ``final/`` is written (``ExportOnTrainEnd``).
_EXPORTED = "[modalforge] exported to"


@dataclass
class ShardedReport:
    """What the sharded runs did, for further asserts."""

    sharded_losses: dict[int, float]
    single_losses: dict[int, float]
    changed: list[str] = field(default_factory=list)
    frozen_changed: list[str] = field(default_factory=list)
    unchanged_trainable: list[str] = field(default_factory=list)
    resume_difference: float | None = None
    #: exported tensor ("<file under final/>:<name>") -> the checkpoint (or initial-build) key it equals
    exported: dict[str, str] = field(default_factory=dict)
    #: what the uninterrupted sharded run printed (stdout and stderr)
    output: str = ""


def _train(args: Sequence[str], timeout: int) -> str:
    """Run ``train`` with ``args``; returns its stdout and stderr together."""
    train = str(Path(sys.executable).parent / "train")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([train, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"train {' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\n"
                             f"STDERR:\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


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


def _initial(name: str, overrides: Sequence[str]) -> dict[str, tuple[str, torch.Tensor]]:
    """The seeded initial build's state: key -> (``"trainable"``, ``"frozen"`` or ``"buffer"``, value)."""
    from modalforge.testing import build_configured, compose_plugin

    cfg = compose_plugin(name, [*SHARDED_FAST_OVERRIDES, "trainer.devices=1", *overrides])
    _, module = build_configured(cfg)
    # keep_vars: tied weights (an lm_head sharing the embedding) appear under both names as one Parameter
    state = {k: v for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    return {k: ("buffer" if not isinstance(v, torch.nn.Parameter) else "trainable" if v.requires_grad else "frozen",
                v.detach().clone()) for k, v in state.items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: the same dtype, shape and bytes (``-0.0`` is not ``0.0``, a NaN equals itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and (a.numel() == 0 or torch.equal(_bits(a), _bits(b)))


def _exported_tensors(final: Path) -> dict[str, torch.Tensor]:
    """``"<file under final/>:<tensor name>"`` -> tensor, over every ``*.safetensors`` in ``final/``."""
    from safetensors.torch import load_file

    return {f"{path.relative_to(final).as_posix()}:{name}": tensor
            for path in sorted(final.rglob("*.safetensors")) for name, tensor in load_file(str(path)).items()}


def check_export(run_dir: str | Path, output: str, weights: dict[str, torch.Tensor],
                 initial: dict[str, tuple[str, torch.Tensor]], steps: int,
                 trained_from: str | None = None) -> dict[str, str]:
    r"""``final/`` of a finished run is the model the run trained; returns exported tensor -> its source key.

    ``final/`` exists with its ``modalforge.json`` (at step ``steps``) and was written once (the run's
    ``output`` says so once). The exported tensors are matched to the gathered checkpoint
    (``weights``), or, for keys a checkpoint leaves out (frozen helpers, rebuilt from the seed), to
    the seeded initial build (``initial``, as from :func:`_initial`):

    - by name: an exported ``model.layers.0.mlp.up_proj.weight`` is the key that ends in it
      (``objective.model.`` or any other prefix stripped); when several do, those naming the file's
      folder (multitask's ``final/<task>/``), then its stem (ppo's ``value_head.safetensors``);
      it must equal one of them bit for bit;
    - by value, for a floating tensor no key ends in (the format renamed it): some tensor of the same
      dtype and shape must equal it bit for bit;
    - ``trained_from``, a regular expression over keys, for a plugin whose export writes its trained
      weights from elsewhere: an exported tensor named as a trainable parameter must equal, bit for
      bit, a key that matches (diffusion: the EMA shadows, ``objective\.ema\.shadow_\d+``), not the
      parameter itself.

    No weight is transformed on the way (no cast, no merge): a plugin whose export does so needs its
    own check. At least one exported tensor must be a trained one.
    """
    import json
    import re

    run_dir = Path(run_dir)
    final = run_dir / "final"
    assert (final / "modalforge.json").is_file(), f"no {final / 'modalforge.json'}: the run did not export"
    assert not final.with_name("final.tmp").exists(), "a half-written export (final.tmp) was left behind"
    written = output.count(_EXPORTED)
    assert written == 1, f"the run exported {written} times ('{_EXPORTED}' in its output), not once"
    meta = json.loads((final / "modalforge.json").read_text())
    assert meta.get("global_step") == steps, f"final/ is of step {meta.get('global_step')}, the run ended at {steps}"
    exported = _exported_tensors(final)
    assert exported, f"final/ holds no *.safetensors: {sorted(p.name for p in final.rglob('*'))}"

    references = {**{k: v for k, (_, v) in initial.items() if k not in weights}, **weights}
    trainable = {k for k, (kind, _) in initial.items() if kind == "trainable"}
    pattern = re.compile(trained_from) if trained_from else None
    by_shape: dict[tuple[torch.dtype, tuple[int, ...]], list[str]] = {}
    for key, value in references.items():
        by_shape.setdefault((value.dtype, tuple(value.shape)), []).append(key)

    matched: dict[str, str] = {}
    for exported_key, tensor in exported.items():
        file, name = exported_key.split(":", 1)
        namesakes = [k for k in references if k == name or k.endswith("." + name)]
        # several keys end in the name: final/<task>/ picks the task's (multitask), then the file's stem
        # the module's (ppo's value_head.safetensors holds a bare "weight")
        for hints in (Path(file).parts[:-1], (Path(file).name.split(".")[0],)):
            own = [k for k in namesakes if any(f".{h}." in f".{k}" for h in hints)]
            namesakes = own if len(namesakes) > 1 and own else namesakes
        same = [k for k in by_shape.get((tensor.dtype, tuple(tensor.shape)), []) if _identical(references[k], tensor)]
        if pattern is not None and any(k in trainable for k in namesakes):
            twins = [k for k in same if pattern.fullmatch(k)]
            assert twins, (f"exported {exported_key} equals no checkpoint tensor matching {trained_from!r} "
                           f"(its namesakes: {namesakes[:3]}; bit-equal: {same[:3]})")
        elif namesakes:
            twins = [k for k in namesakes if k in same]
            if not twins:
                ref = references[namesakes[0]]
                gap = (f"max difference {float((ref.double() - tensor.double()).abs().max()):.3e}"
                       if ref.shape == tensor.shape else f"shape {tuple(ref.shape)}")
                raise AssertionError(f"exported {exported_key} ({tensor.dtype}, {tuple(tensor.shape)}) is not bit "
                                     f"for bit {namesakes[0]} ({ref.dtype}, {gap})")
        elif tensor.is_floating_point():
            twins = same
            assert twins, (f"exported {exported_key} ({tensor.dtype}, {tuple(tensor.shape)}) equals no tensor of "
                           "the checkpoint (nor of the initial build's frozen helpers)")
        else:
            continue  # an integer buffer under a name of the format's own (nothing trained)
        matched[exported_key] = twins[0]
    assert any(k in trainable or (pattern is not None and pattern.fullmatch(k)) for k in matched.values()), (
        f"no exported tensor is a trained one: {dict(list(matched.items())[:8])}")
    return matched


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
                                   samples: bool = False, export: bool = False, export_trained_from: str | None = None,
                                   timeout: int = 600) -> ShardedReport:
    """Train plugin ``name`` on ``devices`` CPU processes under ``strategy`` and check it against one process.

    ``samples=True`` validates the sharded run once at its end, with one sample: every rank must take
    part in the collectives of validation, sampling and image logging, or the run hangs.
    ``batch_size`` is ``data.batch_size`` per rank (``None``: the plugin's own, for plugins whose
    batch size lives elsewhere); ``equal_to_single=False`` for plugins that draw per-rank randomness.
    ``export=True`` leaves ``checkpoint.export_on_end`` on in the sharded runs (not the one-process
    ones) and checks ``final/`` against the gathered ``last.ckpt`` with :func:`check_export`
    (``export_trained_from`` is its ``trained_from``), after the uninterrupted run and after the resume.
    """
    tmp_path = Path(tmp_path)
    base = [f"plugin={name}", *SHARDED_FAST_OVERRIDES, *overrides]
    per_rank = [] if batch_size is None else [f"data.batch_size={batch_size}"]
    sharded = [*base, f"strategy={strategy}", "strategy.timeout=300", f"trainer.devices={devices}", *per_rank]
    if export:
        sharded.remove(_NO_EXPORT)
    if samples:  # one validation at the end (the run is shorter than val_check_interval), one sample
        drop = ("trainer.limit_val_batches=", "module.num_samples=", "trainer.val_check_interval=")
        sharded = [o for o in sharded if not o.startswith(drop)] + ["trainer.limit_val_batches=1",
                                                                  "module.num_samples=1"]
    single = [*base, "trainer.devices=1", *([] if batch_size is None else [f"data.batch_size={batch_size * devices}"])]
    if batch_size is None and equal_to_single:
        raise ValueError("equal_to_single needs batch_size: the one-process run takes devices x batch_size")
    output = _train([*sharded, f"trainer.max_steps={steps}", f"run_dir={tmp_path / 'sharded'}"], timeout)
    report = ShardedReport(_losses(tmp_path / "sharded"), {}, output=output)
    assert len(report.sharded_losses) == steps, f"the sharded run logged {report.sharded_losses}"
    assert all(torch.isfinite(torch.tensor(v)) for v in report.sharded_losses.values()), report.sharded_losses
    if equal_to_single:
        _train([*single, f"trainer.max_steps={steps}", f"run_dir={tmp_path / 'single'}"], timeout)
        report.single_losses = _losses(tmp_path / "single")
        _compare_losses(report.sharded_losses, report.single_losses, tolerance, "one process, same global batch")

    final, initial = _weights(tmp_path / "sharded"), _initial(name, overrides)
    # parameters only: buffers (running statistics) may change either way and are not checked
    for key, value in final.items():
        if initial.get(key, ("buffer",))[0] == "buffer":
            continue
        trainable, start = initial[key][0] == "trainable", initial[key][1]
        moved = not torch.equal(start.to(value.dtype), value)
        if trainable:
            (report.changed if moved else report.unchanged_trainable).append(key)
        elif moved and value.is_floating_point():
            report.frozen_changed.append(key)
    assert report.changed, "no trainable parameter changed under sharding"
    assert not report.unchanged_trainable, f"trainable parameters that never changed: {report.unchanged_trainable[:8]}"
    assert not report.frozen_changed, f"frozen parameters changed: {report.frozen_changed[:8]}"
    if export:
        report.exported = check_export(tmp_path / "sharded", output, final, initial, steps, export_trained_from)

    if resume:
        half, resumed, fewer = steps // 2, tmp_path / "resumed", tmp_path / "fewer"
        _train([*sharded, f"trainer.max_steps={half}", f"run_dir={resumed}"], timeout)
        (fewer / "checkpoints").mkdir(parents=True)
        shutil.copy2(resumed / "checkpoints" / "last.ckpt", fewer / "checkpoints" / "last.ckpt")
        output = _train([*sharded, f"trainer.max_steps={steps}", f"run_dir={resumed}", "ckpt_path=last"], timeout)
        again = _weights(resumed)
        report.resume_difference = max(float((again[k].double() - final[k].double()).abs().max()) for k in final
                                        if final[k].is_floating_point())
        assert report.resume_difference <= 1e-6, (
            f"resuming at step {half} ends {report.resume_difference:.2e} away from the uninterrupted run")
        _compare_losses(_losses(resumed), report.sharded_losses, 1e-6, "the resumed sharded run")
        if export:  # the resumed run's own final/ (the half-way run's was replaced)
            check_export(resumed, output, again, initial, steps, export_trained_from)
        if equal_to_single:  # 2 -> 1: the half-way sharded checkpoint resumed by one process
            _train([*single, f"trainer.max_steps={steps}", f"run_dir={fewer}", "ckpt_path=last"], timeout)
            later = {s: v for s, v in report.sharded_losses.items() if s >= half}
            got = {s: v for s, v in _losses(fewer).items() if s >= half}
            _compare_losses(got, later, tolerance, f"{devices} -> 1 process resume")
    return report
