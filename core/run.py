"""Turn a composed config into a Lightning run: the body of ``train``.

Kept apart from the Hydra entry point so tests and notebooks can call
``run(cfg, output_dir)`` on a config from :func:`modalforge.config.compose`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from modalforge import quiet, registry, run_lock
from modalforge.adapters.stages import export_merged_by_default
from modalforge.batch_size import SEARCH_KEYS, datamodule_config, is_auto, recorded_batch_size
from modalforge.callbacks.batch_size_search import BatchSizeSearch
from modalforge.callbacks.export import ExportOnTrainEnd, exported_step
from modalforge.checkpoints import CONFIG_KEY, explain_load_error, read_checkpoint
from modalforge.errors import ConfigError, RunDirError
from modalforge.callbacks.interrupt import CheckpointOnInterrupt
from modalforge.callbacks.sigterm import SynchronizedSigterm
from modalforge.callbacks.nonfinite import NonFiniteGuard
from modalforge.callbacks.out_of_memory import OutOfMemoryReport, explain_out_of_memory
from modalforge.callbacks.data_identity import DataIdentity, check_resume
from modalforge.callbacks.rng_state import RNGState
from modalforge.callbacks.step_checkpoint import StepCheckpoint
from modalforge.callbacks.validation_schedule import ValidationSchedule
from modalforge.interfaces import Adapter, DataModule, Objective
from modalforge.module import TrainingModule
from modalforge.rundir import check_run_dir, mark_finished
from modalforge.scale import build_strategy, check_precision
from modalforge.scale.batchnorm import BatchNormPerRankNote
from modalforge.trainer_schema import trainer_kwargs
from modalforge.validate import resolved, validate_config


def build_components(cfg: DictConfig, batch_size: int = 1) -> tuple[DataModule, Objective, Adapter]:
    """Instantiate the plugin's DataModule and Objective, and the chosen Adapter.

    ``data.batch_size=auto`` builds the DataModule with ``batch_size`` (the search sets the real
    one at fit start), and the search's own keys (``data.max_batch_size``...) never reach it.
    """
    registry.get(cfg.plugin.name)  # fails loudly, naming the distribution, if the selected plugin is broken
    data = cfg.data
    if is_auto(data.get("batch_size")) or any(key in data for key in SEARCH_KEYS):
        data = datamodule_config(OmegaConf.to_container(data, resolve=True), batch_size)
    datamodule = instantiate(data, _convert_="all")
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
    objective_factory = instantiate(cfg.objective, _partial_=True, _convert_="all")
    objective = objective_factory(model=model_cfg)
    adapter = instantiate(cfg.adapter, _convert_="all")
    return datamodule, objective, adapter


def build_module(cfg: DictConfig, objective: Objective, adapter: Adapter) -> TrainingModule:
    module_cfg = cfg.get("module", {})
    return TrainingModule(
        objective,
        adapter,
        OmegaConf.to_container(cfg.optim, resolve=True),
        gradient_checkpointing=bool(module_cfg.get("gradient_checkpointing", False)),
        num_samples=int(module_cfg.get("num_samples", 0)),
        compile=module_cfg.get("compile", False),
        loss_impl=str(module_cfg.get("loss_impl", "auto")),
    )


def build_callbacks(cfg: DictConfig, output_dir: Path, enable_checkpointing: bool,
                    enable_progress_bar: bool = True) -> list[L.Callback]:
    """The ``callbacks`` group plus checkpointing, Ctrl-C checkpoint and final export."""
    from lightning.pytorch.callbacks import ProgressBar

    callbacks: list[L.Callback] = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    if not enable_progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # Per-rank seeds (seed + rank) once the model is built, and RNG states in checkpoints: exact resume.
    callbacks.append(RNGState(seed=int(cfg.get("seed", 0))))
    # The data files a checkpoint's data position was counted on: a changed one is refused on resume.
    data_cfg = cfg.get("data") or {}
    callbacks.append(DataIdentity([data_cfg.get("train"), data_cfg.get("val")],
                                  str((cfg.get("checkpoint") or {}).get("on_data_change", "refuse"))))
    callbacks.append(quiet.FrozenHelpersInEval())  # no "modules in eval mode" warning for frozen helpers alone
    module_cfg = cfg.get("module") or {}
    # A NaN/Inf loss or gradient norm: stop (or skip the step) before the weights or a checkpoint take it.
    callbacks.append(NonFiniteGuard(str(module_cfg.get("nonfinite", "stop")), int(module_cfg.get("max_skipped_steps", 10))))
    # Out of memory: the batch in hand for the error line; frees the failed step so the state can be saved.
    callbacks.append(OutOfMemoryReport())
    # module.validate_on_start: a step-0 baseline; a run that never reached val_check_interval validates at its end.
    callbacks.append(ValidationSchedule(on_start=bool(module_cfg.get("validate_on_start", False))))
    # SIGTERM (a preempted job): all ranks stop at the same batch, so the collectives after it pair up.
    callbacks.append(SynchronizedSigterm())
    callbacks.append(BatchNormPerRankNote())
    ckpt = cfg.get("checkpoint", {})
    if enable_checkpointing:
        callbacks.append(StepCheckpoint(
            dirpath=output_dir / "checkpoints",
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            save_last=True,
            every_n_train_steps=int(ckpt.get("every_n_train_steps", 100)),
            save_top_k=int(ckpt.get("save_top_k", 0)) or 0,
            monitor="val/loss" if int(ckpt.get("save_top_k", 0)) > 0 else None,
        ))
        # Ctrl-C or a crash mid-run: Lightning calls on_exception; this writes a resumable checkpoint.
        callbacks.append(CheckpointOnInterrupt(output_dir / "checkpoints"))
    if ckpt.get("export_on_end", True):
        metadata = {"plugin": cfg.plugin.name, "adapter": cfg.adapter.get("_target_"),
                    "config": OmegaConf.to_container(cfg, resolve=False)}
        merge = ckpt.get("export_merged")
        if merge is None:
            merge = export_merged_by_default(cfg.get("model"), cfg.get("adapter"))
        callbacks.append(ExportOnTrainEnd(output_dir / "final", metadata=metadata, merge=bool(merge)))
    return callbacks


def _resume_version(folder: Path) -> str | None:
    """A fresh log version for a resumed run: Lightning's CSV logger deletes an existing metrics file."""
    if not (folder / "metrics.csv").exists():
        return None
    n = 1
    while (folder / f"resumed_{n}").exists():
        n += 1
    return f"resumed_{n}"


def build_loggers(cfg: DictConfig, output_dir: Path, resuming: bool = False) -> list[Any] | bool:
    """Loggers of the ``logger`` group, writing under the run directory."""
    nodes = cfg.get("logger") or {}
    loggers = []
    for node in nodes.values():
        if not node:
            continue
        target = node.get("_target_", "")
        kwargs: dict[str, Any] = {}
        if "CSVLogger" in target or "TensorBoardLogger" in target:
            kwargs["save_dir"] = str(output_dir)
            version = _resume_version(output_dir / str(node.get("name", ""))) if resuming else None
            if version is not None:
                kwargs["version"] = version
        elif "WandbLogger" in target or "MLFlowLogger" in target:
            kwargs["save_dir"] = str(output_dir)
        loggers.append(instantiate(node, **kwargs))
    return loggers or False


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` -> newest checkpoint of this run; a run directory -> its newest checkpoint."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        found = _newest_checkpoint(output_dir / "checkpoints")
        if found is None:
            raise RunDirError(f"ckpt_path=last but {output_dir / 'checkpoints'} holds no .ckpt file: nothing to resume",
                              where=f"run_dir={output_dir}",
                              hint="check run_dir (the folder of the run to continue), or drop ckpt_path=last")
        return found
    path = Path(ckpt_path)
    if path.is_dir():
        found = _newest_checkpoint(path / "checkpoints") or _newest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no .ckpt file in {path} or {path / 'checkpoints'}")
        return found
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist")
    return str(path)


def _newest_checkpoint(folder: Path) -> str | None:
    candidates = [p for p in folder.glob("*.ckpt")] if folder.is_dir() else []
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: (p.stat().st_mtime, p.name)))


def close_progress_bars(trainer: L.Trainer) -> None:
    """End the progress bar's line so that an error printed next is a line of its own."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    for callback in trainer.callbacks:
        if isinstance(callback, TQDMProgressBar):
            for name in ("train_progress_bar", "val_progress_bar"):
                bar = getattr(callback, f"_{name}", None)
                if bar is not None and not getattr(bar, "disable", True):
                    bar.close()
    sys.stdout.flush()


def run(cfg: DictConfig, output_dir: str | Path, callbacks: Sequence[L.Callback] = ()) -> tuple[
        L.Trainer, TrainingModule, DataModule]:
    """Train as the config says, holding ``output_dir``'s lock (one ``train`` per run directory).

    ``callbacks`` join the run's own, after them (a benchmark's timer, a notebook's hook), as
    ``callbacks.<name>._target_`` nodes do from a config.
    """
    with run_lock.hold(output_dir):
        return _run(cfg, output_dir, list(callbacks))


def _run(cfg: DictConfig, output_dir: str | Path,
         callbacks: list[L.Callback]) -> tuple[L.Trainer, TrainingModule, DataModule]:
    """Train as the config says; returns the trainer, module and datamodule for inspection.

    The config is validated in full first, and the run directory checked (a finished
    run is never overwritten), before any data is read or model built.
    """
    output_dir = Path(output_dir)
    quiet.install()  # third-party notices that say nothing about this run (core/quiet.py says which, and why)
    validate_config(cfg)
    check_run_dir(output_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    trust = bool((cfg.get("checkpoint") or {}).get("trust", False))  # checkpoint.trust: unpickle any object
    saved = read_checkpoint(ckpt_path, trust=trust) if ckpt_path else {}
    old_config = saved.get(CONFIG_KEY)
    if ckpt_path:  # data files changed under the checkpoint: refused before anything is built from them
        check_resume(saved, str((cfg.get("checkpoint") or {}).get("on_data_change", "refuse")))
    data_cfg = cfg.get("data") or {}
    # data.batch_size=auto: a resume reuses what the run found (the same batches as the run it continues).
    auto = is_auto(data_cfg.get("batch_size"))
    recorded = recorded_batch_size(saved) if auto and ckpt_path else None
    del saved
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule, objective, adapter = build_components(cfg, batch_size=recorded or 1)
    module = build_module(cfg, objective, adapter)
    run_config = resolved(cfg)
    module.run_config = run_config  # saved in each checkpoint, to explain a resume that does not fit

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs = trainer_kwargs(trainer_cfg)
    accelerator = str(kwargs.get("accelerator", "auto"))
    kwargs["precision"] = check_precision(kwargs.get("precision"), accelerator)
    if "strategy" not in kwargs:
        strategy_cfg = OmegaConf.to_container(cfg.strategy, resolve=True) if cfg.get("strategy") else None
        kwargs["strategy"] = build_strategy(strategy_cfg, block_classes=objective.block_classes(), accelerator=accelerator)
    enable_ckpt = kwargs.get("enable_checkpointing", True) is not False
    kwargs["callbacks"] = build_callbacks(cfg, output_dir, enable_ckpt, kwargs.get("enable_progress_bar") is not False) \
        + list(kwargs.get("callbacks") or []) + callbacks
    if auto:  # first: the later callbacks' on_fit_start see the found data.batch_size
        kwargs["callbacks"].insert(0, BatchSizeSearch(
            search=recorded is None, max_batch_size=data_cfg.get("max_batch_size"),
            mode=str(data_cfg.get("batch_size_search") or "power")))
    if kwargs.get("logger", None) is not False:
        kwargs["logger"] = build_loggers(cfg, output_dir, resuming=ckpt_path is not None)
    kwargs.setdefault("default_root_dir", str(output_dir))

    trainer = L.Trainer(**kwargs)
    if auto and recorded is None and trainer.world_size > 1:
        raise ConfigError(f"searches in one process, and this run has {trainer.world_size}",
                          where="data.batch_size=auto",
                          hint="find it once with trainer.devices=1 (the per-device batch under DDP), then set "
                               "data.batch_size=N")
    if ckpt_path:
        print(f"[modalforge] resuming from {ckpt_path}")
        if recorded is not None:
            print(f"[modalforge] data.batch_size=auto: {recorded}, as the checkpoint's run used "
                  f"(set data.batch_size=N to change it)")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=not trust)
    except BaseException as err:
        close_progress_bars(trainer)
        explained = explain_load_error(err, ckpt_path, old_config, run_config) if ckpt_path else None
        if explained is not None:
            raise explained from err
        oom = explain_out_of_memory(err, trainer, run_config)
        if oom is not None:
            raise oom from err
        raise
    if trainer.interrupted:
        return trainer, module, datamodule
    export = next((c for c in trainer.callbacks if isinstance(c, ExportOnTrainEnd)), None)
    # Rank zero decides: other nodes may not see its final/ (no shared disk), and the export is collective.
    if export is not None and trainer.strategy.broadcast(exported_step(export.directory) != trainer.global_step):
        # A resume that was already at max_steps ends before Lightning's on_train_end: export now,
        # so that a finished run always has its final/ of its last step (also after a failed export).
        export.on_train_end(trainer, module)
    if trainer.is_global_zero:
        mark_finished(output_dir, trainer.global_step)
        if os.environ.get("MODALFORGE_QUIET") is None:
            print(f"[modalforge] run directory: {output_dir}")
    return trainer, module, datamodule
