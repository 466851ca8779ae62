"""Writes the trained model in Hugging Face / PEFT format when training ends.

A Lightning checkpoint is for resuming; ``<run_dir>/final`` is for everyone else:
``transformers``/``peft`` load it directly, and it is a valid ``model.name_or_path``
for the next run. Written to a temporary folder and renamed, so a crash never
leaves a half-written export behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


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
        tmp = self.directory.with_name(self.directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module.export(tmp, merge=self.merge)
        (tmp / "modalforge.json").write_text(json.dumps({**self.metadata, "global_step": trainer.global_step},
                                                        indent=2, default=str))
        if self.directory.exists():
            shutil.rmtree(self.directory)
        tmp.rename(self.directory)
        rank_zero_info(f"[modalforge] exported to {self.directory}")
