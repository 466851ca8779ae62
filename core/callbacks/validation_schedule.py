"""Validation a run gets besides Lightning's ``val_check_interval``: a step-0 baseline, and one at the end.

* ``module.validate_on_start=true`` (TRL's ``eval_on_start``): a fresh run validates before its first
  step, logged at step 0 like any validation (Lightning's sanity check logs nothing).
* A run that reaches its last step without having validated (shorter than ``trainer.val_check_interval``
  steps, or than the epoch a fraction of which it names) validates then, so every run with validation
  data has ``val/*`` metrics and samples. Runs that did validate get no extra pass, nor does the resumed
  part of a run whose every-N-steps schedule fired before the checkpoint.

Both go through the fit loop's own validation loop, so metrics, samples, checkpoint monitors and
loggers see them as any other. Nothing runs where Lightning has no validation to do
(``trainer.limit_val_batches=0``, no validation data).
"""

from __future__ import annotations

from typing import Any

import lightning as L


class ValidationSchedule(L.Callback):
    """Args:
        on_start: validate before the first step of a fresh run.
        at_end: validate at the last step of a run that has not validated.
    """

    def __init__(self, on_start: bool = False, at_end: bool = True) -> None:
        self.on_start, self.at_end = on_start, at_end
        self.validated = False  # a validation after step 0 in this run (kept in checkpoints)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_start and trainer.global_step == 0 and trainer.enable_validation:
            # as the training epoch loop runs its own validation (TrainingEpochLoop.on_advance_end)
            loop = trainer.fit_loop.epoch_loop
            first_loop_iter = trainer._logger_connector._first_loop_iter
            trainer.validating = True
            loop.val_loop.run()
            trainer.training = True
            trainer._logger_connector._first_loop_iter = first_loop_iter

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and not trainer.sanity_checking:
            self.validated = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.at_end and not self.validated and not _schedule_reached(trainer) and _is_last_step(trainer):
            # Lightning validates after a batch that asked the fit to stop (the loop's documented
            # early-stopping path); the run ends at this step anyway
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"validated": self.validated}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validated = bool(state_dict.get("validated", False))


def _schedule_reached(trainer: L.Trainer) -> bool:
    """An every-N-batches schedule (``val_check_interval`` an int) that fired in this run, resumed parts included."""
    every = getattr(trainer, "val_check_batch", None)
    if not isinstance(every, int) or isinstance(every, bool) or trainer.check_val_every_n_epoch is not None:
        return False
    return trainer.fit_loop.epoch_loop.total_batch_idx + 1 >= every


def _is_last_step(trainer: L.Trainer) -> bool:
    """The batch just run is the fit's last: ``max_steps`` reached, or the last batch of the last epoch."""
    loop = trainer.fit_loop
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = loop.max_epochs is not None and loop.max_epochs > 0 and trainer.current_epoch + 1 >= loop.max_epochs
    return bool(last_epoch and loop.epoch_loop.batch_progress.is_last_batch)
