"""Writes the trained model in Hugging Face / PEFT format when training ends.

A Lightning checkpoint is for resuming; ``<run_dir>/final`` is for everyone else:
``transformers``/``peft`` load it directly, and it is a valid ``model.name_or_path``
for the next run. Written to a temporary folder and renamed, so a crash never
leaves a half-written export behind (:mod:`modalforge.model_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from modalforge.model_folder import write_model_folder


class ExportOnTrainEnd(L.Callback):
    """Export ``TrainingModule`` to ``directory`` after ``fit`` (rank zero).

    Args:
        directory: destination folder (``<run_dir>/final``).
        metadata: written as ``modalforge.json`` beside the weights (plugin, adapter, config).
        merge: merge PEFT adapters into the base weights instead of saving the adapter.
    """

    def __init__(self, directory: str | Path, metadata: dict[str, Any] | None = None, merge: bool = False) -> None:
        self.directory = Path(directory)
        self.metadata = metadata or {}
        self.merge = merge

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        # Sharded weights (FSDP2) are gathered on every rank into a plain copy on rank zero;
        # the files are rank zero's job.
        module = pl_module.gathered_copy() if getattr(pl_module, "is_sharded", lambda: False)() else pl_module
        if not trainer.is_global_zero:
            return
        write_model_folder(self.directory, module, merge=self.merge,
                           metadata={**self.metadata, "global_step": trainer.global_step},
                           hint="free space, then the same command plus ckpt_path=last writes final/ from the "
                                "last checkpoint (at this step)")
        rank_zero_info(f"[modalforge] exported to {self.directory}")


def exported_step(directory: str | Path) -> int | None:
    """The training step ``directory`` (a ``final/``) was exported at, or ``None`` if there is none."""
    try:
        return int(json.loads((Path(directory) / "modalforge.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
