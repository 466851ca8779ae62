"""``modalforge export``: any checkpoint of a run in the ``final/`` layout.

``final/`` is written when training ends; a run that has not finished (or a step other than the
last) has only Lightning checkpoints. This rebuilds the run's components from the config saved in
the checkpoint (``CONFIG_KEY``; else the run's ``.hydra/config.yaml``), loads the checkpoint's
weights and calls the same ``TrainingModule.export`` as ``ExportOnTrainEnd``: Hugging Face / PEFT /
open_clip files, the processor, and ``modalforge.json``.

The run's data is set up as training would (the model's sizes, the tokenizer and the processor
come from it), so it must still be readable (the synthetic defaults always are).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modalforge.adapters.stages import export_merged_by_default
from modalforge.checkpoints import CONFIG_KEY, read_checkpoint, read_zero_checkpoint
from modalforge.errors import CheckpointError, RunDirError
from modalforge.model_folder import write_model_folder


def _newest_checkpoint(folder: Path) -> Path | None:
    candidates = [p for p in folder.glob("*.ckpt")] if folder.is_dir() else []
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.name)) if candidates else None


def _is_distributed(path: Path) -> bool:
    return path.is_dir() and ((path / ".metadata").exists() or _is_zero(path))


def _is_zero(path: Path) -> bool:
    """A DeepSpeed checkpoint: a folder with a ``latest`` tag file and the per-rank ZeRO states under it."""
    return path.is_dir() and (path / "latest").is_file()


def resolve_source(source: str | Path) -> tuple[Path, Path]:
    """(checkpoint, run directory) for a run directory (its newest checkpoint) or a checkpoint path."""
    path = Path(source).expanduser()
    if not path.exists():
        raise RunDirError("does not exist", where=str(path),
                          hint="give a run directory or a .ckpt file under <run_dir>/checkpoints")
    if path.is_dir() and not _is_distributed(path):
        found = _newest_checkpoint(path / "checkpoints") or _newest_checkpoint(path)
        if found is None:
            raise RunDirError(f"holds no checkpoint (no .ckpt in {path / 'checkpoints'})", where=str(path),
                              hint="checkpoints are written every checkpoint.every_n_train_steps steps")
        path = found
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, run_dir


def _read(path: Path, trust: bool = False) -> dict[str, Any]:
    if _is_zero(path):  # DeepSpeed ZeRO-2/3: gathered to fp32 by Lightning's conversion (needs deepspeed)
        return read_zero_checkpoint(path)
    if _is_distributed(path):  # a sharded (FSDP2) checkpoint: a folder written by torch.distributed.checkpoint
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        try:
            checkpoint = _load_distributed_checkpoint(path)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"not a readable distributed checkpoint: {str(err).splitlines()[0]}",
                                  where=str(path)) from None
        if "state_dict" not in checkpoint and "model" in checkpoint:
            checkpoint["state_dict"] = checkpoint.pop("model")
        return checkpoint
    return read_checkpoint(str(path), trust=trust, switch="--trust")  # weights_only=True unless --trust


def _run_config(checkpoint: dict[str, Any], run_dir: Path, path: Path) -> dict[str, Any]:
    config = checkpoint.get(CONFIG_KEY)
    if config:
        return config
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.exists():
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(saved), resolve=False)  # type: ignore[return-value]
    raise CheckpointError(f"holds no run config and {saved} does not exist: cannot rebuild the model",
                          where=str(path), hint="export a checkpoint written by `train`, inside its run directory")


def export_checkpoint(source: str | Path, out: str | Path | None = None, *, merge_lora: bool = False,
                      overwrite: bool = False, trust: bool = False) -> Path:
    """Write the checkpoint ``source`` (or a run directory's newest) in the ``final/`` layout; returns the folder.

    Args:
        source: a run directory or a checkpoint (``.ckpt`` file, or a distributed-checkpoint folder).
        out: destination (default ``<run_dir>/export/step<N>/``).
        merge_lora: merge a PEFT adapter into the base weights (default: as the run's own export would,
            ``checkpoint.export_merged``, merged when the base exists nowhere else:
            built from scratch, or merged from an earlier stage's adapter).
        overwrite: replace ``out`` if it exists.
        trust: unpickle any object in the checkpoint (``torch.load(weights_only=False)``): a trusted file only.
    """
    from omegaconf import OmegaConf

    from modalforge.run import build_components, build_module

    path, run_dir = resolve_source(source)
    checkpoint = _read(path, trust)
    cfg = OmegaConf.create(_run_config(checkpoint, run_dir, path))
    step = int(checkpoint.get("global_step", 0))
    directory = Path(out).expanduser() if out else run_dir / "export" / f"step{step:07d}"
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        what = "the finished run's final/" if directory.resolve() == (run_dir / "final").resolve() else "not empty"
        raise RunDirError(f"{what}: not overwritten", where=f"--out {directory}",
                          hint="choose another --out, or add --overwrite")

    datamodule, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    datamodule.prepare_data()
    datamodule.setup("fit")
    objective.connect(datamodule)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)  # fills the frozen helpers' keys, drops 4-bit quantisation state
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"does not fit the model its config builds: {str(err).splitlines()[0]}",
                              where=str(path)) from None

    ckpt_cfg = cfg.get("checkpoint") or {}
    merge = ckpt_cfg.get("export_merged")
    if merge is None:
        merge = export_merged_by_default(cfg.get("model"), cfg.get("adapter"))
    merge = bool(merge) or merge_lora
    metadata = {"plugin": cfg.plugin.name, "adapter": cfg.adapter.get("_target_"),
                "config": OmegaConf.to_container(cfg, resolve=False), "global_step": step,
                "exported_from": str(path)}
    write_model_folder(directory, module, merge=merge, metadata=metadata,
                       hint="free space, then run the same export again (add --overwrite to replace a kept folder)")
    return directory


def main(args: Any) -> None:
    """``modalforge export`` (arguments from :func:`add_arguments`)."""
    directory = export_checkpoint(args.source, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite,
                                  trust=getattr(args, "trust", False))
    print(f"[modalforge] exported {args.source} to {directory}")


def add_arguments(parser: Any) -> None:
    parser.add_argument("source", help="a run directory (its newest checkpoint) or a checkpoint file")
    parser.add_argument("--out", default=None, help="destination folder (default: <run_dir>/export/step<N>/)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="merge a LoRA (PEFT) adapter into the base weights instead of saving the adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--trust", action="store_true", help="load a checkpoint that holds more than tensors and "
                        "plain values (unpickling can run code: only for a file you trust)")
