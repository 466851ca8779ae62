"""Conformance checks every plugin runs against itself, built-in or third-party.

Usage in a plugin's own tests::

    from modalforge.testing import assert_plugin_conforms

    def test_conforms(tmp_path):
        assert_plugin_conforms("my_plugin", tmp_path, overrides=["data.batch_size=4"])

The checks: the plugin's config composes and every ``_target_`` in it binds to its
target's signature (without instantiating); a few steps run on the synthetic
default; the loss is finite and falls; trainable parameters change and frozen
ones do not; a checkpoint round-trips into a fresh module.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

from modalforge.checkpoints import read_checkpoint
from modalforge.config import compose
from modalforge.run import build_components, build_module
from modalforge.scale.conformance import QUICK_OVERRIDES

#: One quick process: QUICK_OVERRIDES (shared with the multi-process check), one device, no loggers, no callbacks.
FAST_OVERRIDES = (
    *QUICK_OVERRIDES,
    "trainer.devices=1",
    "logger=none",
    "callbacks=none",
)


@dataclass
class ConformanceReport:
    """What the checks measured, for a plugin's tests to assert more on."""

    losses: list[float] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged_trainable: list[str] = field(default_factory=list)
    frozen_changed: list[str] = field(default_factory=list)


def compose_plugin(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The plugin's full ``train`` config, as ``train plugin=<name> <overrides>`` would see it."""
    return compose([f"plugin={name}", *overrides])


def check_config_binds(cfg: DictConfig | ListConfig, path: str = "") -> list[str]:
    """Bind every ``_target_`` node's keys to its target's signature; returns the problems found.

    Interpolations are left unresolved where they need a running Hydra job.
    """
    problems: list[str] = []
    if isinstance(cfg, DictConfig):
        target = cfg.get("_target_") if "_target_" in cfg else None
        if target is not None:
            try:
                obj = get_object(str(target))
                signature = inspect.signature(obj)
                keys = {k: None for k in cfg if not str(k).startswith("_")}
                has_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
                unknown = [k for k in keys if k not in signature.parameters and not has_var_kw]
                if unknown:
                    problems.append(f"{path or '<root>'}: {target} takes no argument(s) {unknown}")
            except Exception as err:  # noqa: BLE001
                problems.append(f"{path or '<root>'}: cannot resolve {target}: {err}")
        for key in cfg:
            if str(key) == "hydra":
                continue
            child = cfg._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                problems += check_config_binds(child, f"{path}.{key}" if path else str(key))
    elif isinstance(cfg, ListConfig):
        for i, child in enumerate(cfg._iter_ex(resolve=False)):
            if isinstance(child, (DictConfig, ListConfig)):
                problems += check_config_binds(child, f"{path}[{i}]")
    return problems


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The step's loss (mean over all its items), not the per-item sum a micro-batch backpropagates.
        step_loss = getattr(getattr(pl_module, "step_loss", None), "last", None)
        loss = step_loss if step_loss is not None else (outputs["loss"] if isinstance(outputs, dict) else outputs)
        self.losses.append(float(loss.detach()))


def _snapshot(module: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in module.named_parameters()}


def build_configured(cfg: DictConfig) -> tuple[Any, Any]:
    """The seeded DataModule (set up) and TrainingModule (models built, adapter applied) of ``cfg``."""
    L.seed_everything(int(cfg.seed), verbose=False)
    datamodule, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    datamodule.setup("fit")
    objective.connect(datamodule)
    module.configure_model()
    return datamodule, module


def run_steps(cfg: DictConfig, tmp_path: Path, steps: int) -> tuple[L.Trainer, Any, ConformanceReport]:
    """Train ``steps`` steps on CPU with no logging; report losses and which parameters moved."""
    datamodule, module = build_configured(cfg)
    before = _snapshot(module)
    recorder = _LossRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[recorder], default_root_dir=str(tmp_path),
                        use_distributed_sampler=False, gradient_clip_val=cfg.trainer.get("gradient_clip_val"))
    trainer.fit(module, datamodule=datamodule)
    report = ConformanceReport(losses=recorder.losses)
    for name, param in module.named_parameters():
        trainable, old = before[name]
        moved = not torch.equal(old, param.detach())
        if trainable and moved:
            report.changed.append(name)
        elif trainable:
            report.unchanged_trainable.append(name)
        elif moved:
            report.frozen_changed.append(name)
    return trainer, module, report


def check_loss_falls(losses: Sequence[float], window: int = 3) -> None:
    """Every loss finite, and the mean of the last ``window`` below the mean of the first ``window``."""
    assert losses, "no training step ran"
    assert all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
    window = max(1, min(window, len(losses) // 2))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < first, f"loss did not fall: first {window} mean {first:.4f}, last {window} mean {last:.4f} ({losses})"


def check_checkpoint_roundtrip(cfg: DictConfig, trainer: L.Trainer, module: Any, tmp_path: Path) -> None:
    """A Lightning checkpoint loads into a freshly built module with identical weights."""
    path = Path(tmp_path) / "conformance.ckpt"
    trainer.save_checkpoint(str(path), weights_only=False)  # full state, as a run's checkpoints
    _, fresh = build_configured(cfg)  # seeded as `train` does: a frozen 4-bit base is rebuilt, not loaded
    checkpoint = read_checkpoint(str(path))  # weights_only=True: a checkpoint must load without unpickling code
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    expected = module.state_dict()
    for key, value in fresh.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        assert torch.equal(value.cpu(), expected[key].cpu()), f"checkpoint round-trip changed {key}"


def assert_plugin_conforms(name: str, tmp_path: str | Path, overrides: Sequence[str] = (), *, steps: int = 8,
                           loss_window: int = 3) -> ConformanceReport:
    """Run every conformance check on plugin ``name``; returns the report for further asserts."""
    tmp_path = Path(tmp_path)
    cfg = compose_plugin(name, [*FAST_OVERRIDES, f"trainer.max_steps={steps}", *overrides])
    problems = check_config_binds(cfg)
    assert not problems, "config does not bind to its targets:\n" + "\n".join(problems)
    trainer, module, report = run_steps(cfg, tmp_path, steps)
    check_loss_falls(report.losses, loss_window)
    assert report.changed, "no trainable parameter changed after training"
    assert not report.unchanged_trainable, f"trainable parameters that never changed: {report.unchanged_trainable[:10]}"
    assert not report.frozen_changed, f"frozen parameters changed: {report.frozen_changed[:10]}"
    check_checkpoint_roundtrip(cfg, trainer, module, tmp_path)
    return report


from modalforge.scale.conformance import assert_plugin_conforms_sharded  # noqa: E402 - the multi-process check
