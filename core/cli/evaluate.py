"""``modalforge eval``: a run's validation metrics on any data, without training.

Why a command: comparing checkpoints on a new validation set (or on more devices) used to mean a
fresh ``train`` with ``trainer.max_steps=0`` tricks. This rebuilds the run from its saved config
(``<run_dir>/.hydra/config.yaml``, Hydra overrides applied on top), loads the weights and calls
Lightning's ``trainer.validate``, so metrics, samples and multi-device reduction are the run's own.

Where the weights come from:

- a run directory: its newest checkpoint; a ``.ckpt`` file (or distributed-checkpoint folder): that one.
  Lightning loads it (``trainer.validate(ckpt_path=...)``), so sharded checkpoints work too.
- a ``final/`` folder: the parent run's config with ``model.name_or_path=<final>`` where the model
  config has that key and ``final/`` holds full Hugging Face weights (``config.json``), under the
  ``full`` adapter (nothing trains; a merged LoRA is already in the weights). Otherwise (a plugin whose
  model names no folder, e.g. image_classification's ``model.name``, or a PEFT adapter alone) the run's
  newest checkpoint, which is the step ``final/`` was exported at; a note says so.

The metrics go where a run's go: ``<run_dir>/eval/<timestamp>/csv/metrics.csv`` beside a
``.hydra/config.yaml`` of the evaluation, so ``modalforge compare <eval dir>`` reads it as a run.

``--lm-eval tasks=...`` runs EleutherAI's lm-evaluation-harness on a ``final/`` instead
(:mod:`modalforge.cli.lm_eval`).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from modalforge.errors import CheckpointError, ConfigError, RunDirError

#: All ranks of a multi-device evaluation write into the folder rank zero chose (Lightning's
#: launcher starts the other ranks with this process's environment).
_DIR_ENV = "MODALFORGE_EVAL_DIR"
_FULL_ADAPTER = {"_target_": "modalforge.adapters.FullAdapter"}


@dataclass
class EvalSource:
    """What to evaluate: the run directory (config), and a checkpoint or a model folder (weights)."""

    run_dir: Path
    checkpoint: Path | None = None
    folder: Path | None = None
    note: str | None = None


def _config_file(run_dir: Path) -> Path | None:
    """The newest attempt's ``config.yaml`` (a resumed run writes ``.hydra/attempt_N/``)."""
    hydra_dir = run_dir / ".hydra"
    attempts = sorted((p for p in hydra_dir.glob("attempt_*") if (p / "config.yaml").is_file()),
                      key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else 0)
    for candidate in [*reversed(attempts), hydra_dir]:
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
    return None


def _is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "modalforge.json").is_file()


def resolve(source: str | Path) -> EvalSource:
    """The run directory and weights of a run directory, a ``final/`` folder or a checkpoint."""
    from modalforge.cli.export import resolve_source

    path = Path(source).expanduser()
    if _is_model_folder(path):
        return EvalSource(run_dir=path.parent, folder=path)
    checkpoint, run_dir = resolve_source(path)  # RunDirError: missing, or no checkpoint
    return EvalSource(run_dir=run_dir, checkpoint=checkpoint)


def load_config(run_dir: Path, where: str) -> DictConfig:
    """The run's saved config, or a ``RunDirError`` naming the file that is missing."""
    file = _config_file(run_dir)
    if file is None:
        raise RunDirError(f"no run config ({run_dir / '.hydra' / 'config.yaml'} does not exist)", where=where,
                          hint="evaluate a run directory written by `train`, its final/ or a checkpoint inside it")
    return OmegaConf.load(file)  # type: ignore[return-value]


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Hydra's ``key=value`` / ``+key=value`` / ``~key`` on a saved config (no config groups: it is composed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors, as one line
        raise ConfigError(str(err).splitlines()[0], where="overrides",
                          hint="key=value, +key=value or ~key, as for train") from None
    for override in parsed:
        key = override.key_or_group
        exists = OmegaConf.select(cfg, key, default="__missing__") != "__missing__"
        if override.is_delete():
            if not exists:
                raise ConfigError("cannot delete: not in the run's config", where=key)
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            node.pop(leaf)  # type: ignore[union-attr]
            continue
        if not exists and not override.is_add():
            raise ConfigError("unknown key in the run's config", where=key,
                              hint=f"add a new key with +{key}=...; a config group cannot change after the run")
        OmegaConf.update(cfg, key, override.value(), merge=True, force_add=override.is_add())


def _use_folder(cfg: DictConfig, source: EvalSource) -> None:
    """Point the model at ``final/`` where the plugin builds it from a folder, else fall back to a checkpoint."""
    from modalforge.cli.export import resolve_source

    folder = source.folder
    assert folder is not None
    model = cfg.get("model")
    if isinstance(model, DictConfig) and "name_or_path" in model and (folder / "config.json").is_file():
        model.name_or_path = str(folder)
        cfg.adapter = OmegaConf.create(_FULL_ADAPTER)
        return
    why = ("its model config has no name_or_path" if not (isinstance(model, DictConfig) and "name_or_path" in model)
           else f"{folder} holds no full model (config.json)")
    try:
        checkpoint, _ = resolve_source(source.run_dir)
    except RunDirError:
        raise CheckpointError(f"cannot be evaluated: {why}, and {source.run_dir / 'checkpoints'} holds no checkpoint",
                              where=str(folder), hint="evaluate a checkpoint of the run instead") from None
    source.checkpoint, source.folder = checkpoint, None
    source.note = f"{why}: evaluating the run's newest checkpoint {checkpoint} instead"


def eval_dir(run_dir: Path) -> Path:
    """``<run_dir>/eval/<timestamp>`` (a suffix where two start in one second); one for all ranks."""
    chosen = os.environ.get(_DIR_ENV)
    if chosen:
        return Path(chosen)
    base = run_dir / "eval" / time.strftime("%Y-%m-%d_%H-%M-%S")
    directory, n = base, 1
    while directory.exists():
        directory, n = base.with_name(f"{base.name}_{n}"), n + 1
    os.environ[_DIR_ENV] = str(directory)
    return directory


def _write_config(directory: Path, cfg: DictConfig, overrides: Sequence[str], source: EvalSource) -> None:
    hydra_dir = directory / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    (hydra_dir / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides) or "[]\n")
    weights = source.folder or source.checkpoint
    (directory / "source.json").write_text(json.dumps({"run_dir": str(source.run_dir), "weights": str(weights)}) + "\n")


def _trainer(cfg: DictConfig, directory: Path, block_classes: set[type]) -> Any:
    """A Lightning Trainer as the run's (devices, precision, strategy, loggers), without training callbacks."""
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    from modalforge import quiet
    from modalforge.run import build_loggers
    from modalforge.scale import build_strategy, check_precision
    from modalforge.trainer_schema import trainer_kwargs

    kwargs = trainer_kwargs(OmegaConf.to_container(cfg.trainer, resolve=True))
    accelerator = str(kwargs.get("accelerator", "auto"))
    kwargs["precision"] = check_precision(kwargs.get("precision"), accelerator)
    if "strategy" not in kwargs:
        strategy_cfg = OmegaConf.to_container(cfg.strategy, resolve=True) if cfg.get("strategy") else None
        kwargs["strategy"] = build_strategy(strategy_cfg, block_classes=block_classes, accelerator=accelerator)
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node]
    drop = (ModelCheckpoint,) + ((ProgressBar,) if kwargs.get("enable_progress_bar") is False else ())
    kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, drop)] + [quiet.FrozenHelpersInEval()]
    kwargs["logger"] = build_loggers(cfg, directory)
    kwargs["default_root_dir"] = str(directory)
    kwargs["enable_checkpointing"] = False
    return L.Trainer(**kwargs)


def evaluate(source: str | Path, overrides: Sequence[str] = (), *, trust: bool = False) -> tuple[Path, dict[str, float]]:
    """Validate ``source``'s weights with its run's config plus ``overrides``; returns (eval dir, metrics)."""
    owned = _DIR_ENV not in os.environ  # this process chooses the folder (the other ranks inherit it)
    try:
        return _evaluate(source, overrides, trust)
    finally:
        if owned:
            os.environ.pop(_DIR_ENV, None)


def _evaluate(source: str | Path, overrides: Sequence[str], trust: bool) -> tuple[Path, dict[str, float]]:
    import lightning as L

    from modalforge import quiet
    from modalforge.run import build_components, build_module
    from modalforge.validate import validate_config

    found = resolve(source)
    cfg = load_config(found.run_dir, str(source))
    apply_overrides(cfg, overrides)
    if found.folder is not None:
        _use_folder(cfg, found)
    directory = eval_dir(found.run_dir)
    cfg.run_dir = str(directory)
    cfg.ckpt_path = None
    validate_config(cfg)
    quiet.install()
    L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)
    datamodule, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    trainer = _trainer(cfg, directory, objective.block_classes())
    if trainer.is_global_zero:
        _write_config(directory, cfg, overrides, found)
        if found.note:
            print(f"[modalforge] eval: {found.note}")
    ckpt = str(found.checkpoint) if found.checkpoint is not None else None
    # Lightning asks for the training callbacks whose state the checkpoint holds: validation needs none.
    warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=not trust, verbose=False)
    metrics = {k: float(v) for result in results for k, v in result.items()}
    if not sum(trainer.num_val_batches) or not metrics:
        raise ConfigError("ran no validation batch: this plugin or its data has no validation set",
                          where=f"{cfg.plugin.name} data.val",
                          hint="give one with data.val=<file> (and trainer.limit_val_batches=1.0)")
    if trainer.is_global_zero:
        from modalforge.rundir import mark_finished

        step = _evaluated_step(found)
        mark_finished(directory, step)
    return directory, metrics


def _evaluated_step(source: EvalSource) -> int:
    """The training step of the weights (the checkpoint's, or the one ``final/`` was exported at)."""
    from modalforge.callbacks.export import exported_step

    if source.folder is not None:
        return exported_step(source.folder) or 0
    from modalforge.checkpoints import read_checkpoint

    try:
        if source.checkpoint is not None and source.checkpoint.is_file():
            return int(read_checkpoint(str(source.checkpoint), trust=False).get("global_step", 0))
    except Exception:  # noqa: BLE001 - the step only labels the report
        pass
    return 0


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as a two-column table, ``val/loss`` first."""
    names = sorted(metrics, key=lambda m: (m != "val/loss", m.count("/"), m))
    width = max(len("metric"), *(len(n) for n in names))
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{n.ljust(width)}  {metrics[n]:.6g}" for n in names]
    return "\n".join(lines)


def main(args: Any) -> None:
    """``modalforge eval`` (arguments from :func:`add_arguments`)."""
    from lightning.pytorch.utilities import rank_zero_only

    if getattr(args, "lm_eval", None) is not None:
        from modalforge.cli import lm_eval

        return lm_eval.main(args)
    given = [flag for flag, dest in _LM_EVAL_FLAGS if getattr(args, dest, None) not in (None, [])]
    if given:
        raise ConfigError("is an lm_eval setting", where=given[0], hint="add --lm-eval tasks=<task>[,<task>...]")
    directory, metrics = evaluate(args.source, args.overrides, trust=args.trust)
    if rank_zero_only.rank == 0:
        print(format_metrics(metrics))
        print(f"[modalforge] eval metrics written to {directory / 'csv' / 'metrics.csv'} "
              f"(modalforge compare {directory})")


def add_arguments(parser: Any) -> None:
    parser.add_argument("source", help="a run directory (its newest checkpoint), its final/ folder, or a checkpoint")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run's config: data.val=other.jsonl "
                        "trainer.devices=2 ...")
    parser.add_argument("--trust", action="store_true", help="load a checkpoint that holds more than tensors and "
                        "plain values (unpickling can run code: only for a file you trust)")
    group = parser.add_argument_group("lm-evaluation-harness (pip install \"modalforge[eval]\")",
                                      "--lm-eval scores a final/ folder (a run directory: its final/; a PEFT "
                                      "adapter: on its base) with EleutherAI's lm_eval instead of the run's validation")
    group.add_argument("--lm-eval", metavar="tasks=T1,T2", default=None, help="run lm_eval on these tasks")
    group.add_argument("--num-fewshot", metavar="N", default=None, help="few-shot examples per document "
                       "(default: each task's own)")
    group.add_argument("--limit", metavar="N", default=None, help="at most N documents per task (below 1: a fraction)")
    group.add_argument("--batch-size", metavar="N|auto", default=None, help="default 1; auto finds the largest that fits")
    group.add_argument("--include-path", metavar="DIR", action="append", default=None,
                       help="a folder of task YAML files (repeatable)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda where there is one)")
    group.add_argument("--out", metavar="DIR", default=None, help="where lm_eval.json goes (default: "
                       "<run_dir>/eval/lm_eval/, or <folder>_lm_eval/ for a folder in no run)")


#: The lm_eval flags (and their argparse names), refused without --lm-eval.
_LM_EVAL_FLAGS = (("--num-fewshot", "num_fewshot"), ("--limit", "limit"), ("--batch-size", "batch_size"),
                  ("--include-path", "include_path"), ("--device", "device"), ("--out", "out"))
