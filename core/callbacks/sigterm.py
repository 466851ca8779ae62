"""Stop every rank at the same step on SIGTERM (a preempted job), so the checkpoint it writes cannot hang.

Lightning 2.6's SIGTERM handler broadcasts from inside the signal handler, and its
loops raise ``SIGTERMException`` wherever each rank reads its own flag. Ranks get the
signal at different moments (rank zero forwards it to its children), so one rank could
enter the checkpoint's barrier while another was still in a gradient all-reduce or in
the handler's broadcast: the collectives paired wrongly and the run froze until the
process group's timeout (seen on 2 CPU processes, about one run in three on a loaded
machine). Written by hand because Lightning offers no switch for it: the handler here only
notes the signal (and forwards it to the children, as Lightning's does), and the ranks
agree at the end of each training batch, through one all-reduce, to stop there together.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

import lightning as L
import torch


class SynchronizedSigterm(L.Callback):
    """Replace Lightning's SIGTERM notifier by a note that all ranks act on at the same batch end."""

    def __init__(self) -> None:
        self.noted = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The trainer registers its handlers after the callbacks' setup; an instance attribute
        # shadows the method it binds there. SLURM requeue and earlier handlers stay composed with it.
        self.noted = False
        trainer._signal_connector._sigterm_notifier_fn = self._notify_factory(trainer)

    def _notify_factory(self, trainer: L.Trainer):
        def note(signum: int, frame: FrameType | None) -> None:
            if not self.noted:
                launcher = trainer.strategy.launcher
                if launcher is not None:
                    launcher.kill(signal.Signals(signum))  # rank zero's children, started by Lightning
            self.noted = True
            if trainer.world_size == 1:
                trainer._signal_connector.received_sigterm = True  # nothing to agree with: stop as Lightning would

        return note

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.received_sigterm or trainer.world_size == 1:
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        flag = torch.tensor([1 if self.noted else 0], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            # Every rank now raises SIGTERMException at the end of this batch, together.
            trainer._signal_connector.received_sigterm = True
