"""Lightning's ``ModelCheckpoint`` with its ``state_key`` computed once, and ``last`` saved at the final step.

A run that stops at ``trainer.max_steps`` in the middle of an epoch gets its ``last``
checkpoint from Lightning at the epoch's end hook, with the epoch counted as finished: a
later ``trainer.max_steps=<more> ckpt_path=last`` then starts the next epoch and skips the
rest of this one's data. Saved after the final batch instead (as ``every_n_train_steps``
saves), the checkpoint is mid-epoch and resume continues with the next batch, exactly as
the uninterrupted run would.

Lightning labels every callback hook call for its profiler with the callback's ``state_key``,
even with no profiler; ``ModelCheckpoint`` builds that key from a repr of its settings (about
7 µs), and a training step calls about ten hooks: a fixed cost per step that buys nothing, since
the settings do not change after ``__init__``. The key is the one ``ModelCheckpoint`` gives, so
checkpoints written with either class restore the callback's state in the other.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``state_key`` is cached (same value as ``ModelCheckpoint``'s)."""

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_cached_state_key")
        if key is None:
            key = super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
            self._cached_state_key = key
        return key

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if final and self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
