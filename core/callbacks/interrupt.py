"""Write a resumable checkpoint when a run stops on Ctrl-C, SIGTERM or an error.

Lightning's ``OnExceptionCheckpoint`` does this too, but its presence makes
``fit(ckpt_path=None)`` resume silently from the newest ``last*.ckpt`` in the
folder, so a fresh run in a reused ``run_dir`` would not be fresh. modalforge
resumes only when asked (``ckpt_path=last``), hence this small callback.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from modalforge.data.errors import DataError


class CheckpointOnInterrupt(L.Callback):
    """Save ``<dirpath>/<filename>.ckpt`` from ``on_exception``.

    Args:
        dirpath: the run's checkpoint folder.
        filename: file name without suffix.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last-interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0:
            return  # nothing trained yet: keep whatever checkpoint was there
        from modalforge.callbacks.nonfinite import NonFiniteError

        from modalforge.model_folder import ModelFolderError

        if isinstance(exception, NonFiniteError):
            return  # a NaN step: the last good checkpoint stays the newest, nothing is written after it
        if isinstance(exception, ModelFolderError):
            return  # final/ failed after training: last.ckpt holds this step, and the disk may be full
        trainer.save_checkpoint(str(self.path), weights_only=False)  # the full state (optimizer, loops): a resume point
        how = "resume with the same command plus ckpt_path=last"
        if isinstance(exception, DataError):
            # Resuming alone would meet the same record again.
            skip = " or add data.skip_bad=true to skip unreadable files," if hasattr(trainer.datamodule, "skip_bad") else ""
            how = f"fix or remove the bad record{skip} then {how}"
        rank_zero_info(f"[modalforge] {type(exception).__name__}: saved {self.path} at step {trainer.global_step}; {how}")
