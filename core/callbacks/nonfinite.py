"""Stop (or skip) a step whose loss or gradient norm is NaN or Inf, before it reaches the weights.

Lightning carries on with NaN weights, and the next checkpoint saves them. Here the
step's loss and gradient norm are checked once its gradients are accumulated and
reduced (``on_before_optimizer_step``, before clipping and the optimizer step), so
the weights are still those of the last good step when the run stops:

- ``module.nonfinite=stop`` (the default) ends the run with one line naming the step
  and batch and the last good checkpoint, which is never overwritten: no checkpoint
  is written after the bad step (``CheckpointOnInterrupt`` leaves this error alone), and
  a checkpoint whose weights are not finite is refused before it is written.
- ``module.nonfinite=skip`` drops the step's gradients, so the optimizer leaves every
  parameter and its state as they were; ``train/skipped_steps`` counts the skipped
  steps, and more than ``module.max_skipped_steps`` in a row stop the run as above.
- ``module.nonfinite=off``: no check (it costs one host sync per step on a GPU).

Batches carry no record provenance (they are collated, packed or tokenised), so the
line names the step, the batch index and the epoch. Under several processes the
verdict is all-reduced, so every rank stops or skips together and none is left waiting.
With ``precision=16-mixed`` the gradient scaler already skips steps with Inf gradients
(that is how it finds its scale), so only the loss is checked there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch

from modalforge.errors import ModalforgeError

NonFiniteMode = Literal["stop", "skip", "off"]
NONFINITE_MODES: tuple[str, ...] = ("stop", "skip", "off")


class NonFiniteError(ModalforgeError):
    """A NaN or Inf loss, gradient norm or weight; ``where`` is the step and batch."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor (FSDP2): this rank's shard
    return to_local() if callable(to_local) else tensor


def _norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each gradient's 2-norm in float32 (one fused kernel per device), all on the first one's device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    first, out = grads[0].device, []
    for group in by_device.values():
        try:
            parts = torch._foreach_norm(group, 2, dtype=torch.float32)
        except TypeError:  # an older torch without dtype=
            parts = [g.float().norm() for g in group]
        out.append(torch.stack(list(parts)).to(first))
    return out


def gradient_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor | None:
    """The 2-norm of this rank's gradients (its shards under FSDP), in float32; ``None`` without gradients."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.cat(_norms(grads)))


def _value(number: float) -> str:
    return "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf") if math.isinf(number) else f"{number:.4g}"


class NonFiniteGuard(L.Callback):
    """Check each optimizer step's loss and gradient norm; stop or skip a non-finite one.

    Args:
        mode: ``stop``, ``skip`` or ``off`` (``module.nonfinite``).
        max_skipped_steps: with ``skip``, how many steps in a row may be skipped; the next one stops.
    """

    def __init__(self, mode: NonFiniteMode = "stop", max_skipped_steps: int = 10) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"mode must be one of {NONFINITE_MODES}, got {mode!r}")
        self.mode, self.max_skipped_steps = mode, int(max_skipped_steps)
        self.skipped = 0  # steps skipped in this run (train/skipped_steps)
        self.in_a_row = 0
        self._batch_idx = 0
        self._saved_step: int | None = None  # the step of the newest checkpoint this run wrote

    # ---- the check ----------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.mode == "off":
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        check_grads = str(trainer.precision) != "16-mixed"
        grads = [_local(p.grad) for p in params if p.grad is not None] if check_grads else []
        loss = self._step_loss(pl_module)
        # One probe: the sum of the per-gradient norms and the loss is finite exactly when all are
        # (a sum of norms that overflows is a gradient norm that does too), read with one host sync.
        terms = [torch.cat(_norms(grads)).sum()] if grads else []
        if loss is not None:
            terms.append(loss.detach().float().reshape(()))
        if not terms:
            return
        probe = terms[0] if len(terms) == 1 else terms[0] + terms[1].to(terms[0].device)
        if trainer.world_size > 1:
            # Every rank's probe summed: a NaN on one rank's loss or gradient shard reaches all of them,
            # so every rank stops or skips together and none is left waiting in a collective.
            probe = trainer.strategy.reduce(probe.to(pl_module.device), reduce_op="sum")
        if math.isfinite(float(probe)):
            self.in_a_row = 0
            self._log(pl_module)
            return
        what = self._describe(float(loss) if loss is not None else 0.0,
                              float(gradient_norm(params)) if grads else 0.0)
        if self.mode == "skip" and self.in_a_row < self.max_skipped_steps:
            for p in params:
                p.grad = None  # the optimizer skips parameters without a gradient: no update, no state change
            self.skipped += 1
            self.in_a_row += 1
            self._log(pl_module)
            return
        self._stop(trainer, what)

    @staticmethod
    def _step_loss(pl_module: L.LightningModule) -> torch.Tensor | None:
        # The step's loss sum so far (StepLoss leaves out micro-batches with no item, whose mean is
        # NaN by design); the module turns it into the logged train/loss after this hook.
        step_loss = getattr(pl_module, "step_loss", None)
        total = getattr(step_loss, "_sum", None)
        return total if total is not None else getattr(pl_module, "last_loss", None)

    @staticmethod
    def _describe(loss: float, norm: float) -> str:
        """This rank's non-finite values, or that another rank's were."""
        parts = [f"the {name} is {_value(value)}" for name, value in (("loss", loss), ("gradient norm", norm))
                 if not math.isfinite(value)]
        return " and ".join(parts) or "another rank's loss or gradient norm is not finite"

    def _log(self, pl_module: L.LightningModule) -> None:
        if self.skipped:
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)

    def _where(self, trainer: L.Trainer) -> str:
        return f"step {trainer.global_step + 1} (batch {self._batch_idx} of epoch {trainer.current_epoch})"

    def _kept(self, trainer: L.Trainer) -> str | None:
        good = last_good_checkpoint(trainer)
        if good is None:
            return None
        return f"{good} (step {self._saved_step})" if self._saved_step is not None else good

    def _stop(self, trainer: L.Trainer, what: str) -> None:
        good = self._kept(trainer)
        kept = f"the last good checkpoint, {good}, is kept" if good else "no checkpoint was written before it"
        if self.mode == "skip":
            message = (f"{what}: {self.in_a_row + 1} steps in a row (more than module.max_skipped_steps="
                       f"{self.max_skipped_steps}; {self.skipped} skipped in all); the run stops, and {kept}")
        else:
            message = f"{what}; the run stops before the weights take it, and {kept}"
        hint = ("lower optim.lr, set trainer.gradient_clip_val=1.0 or check the data of that batch"
                + ("" if self.mode == "skip" else "; module.nonfinite=skip skips such steps instead")
                + ("; continue from the checkpoint with ckpt_path=last" if good else ""))
        raise NonFiniteError(message, where=self._where(trainer), hint=hint)

    # ---- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.mode == "off":
            return
        flags = [torch.isfinite(_local(p.detach())).all() for p in pl_module.parameters() if p.numel()]
        finite = torch.stack(flags).all().float().reshape(1) if flags else torch.ones(1)
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce(finite.to(pl_module.device), reduce_op="min")
        if float(finite) < 1:
            good = self._kept(trainer)
            raise NonFiniteError(
                "the weights are not finite (an optimizer step made them so); this checkpoint is not written"
                + (f" and the last good one, {good}, is kept" if good else ""),
                where=f"step {trainer.global_step}", hint="lower optim.lr or set trainer.gradient_clip_val=1.0")
        self._saved_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = int(state_dict.get("in_a_row", 0))


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint this run wrote (or resumed from), as a path, with its step if known."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    written = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            for path in (callback.last_model_path, callback.best_model_path):
                if path and Path(path).is_file():
                    written.append(Path(path))
    if not written and trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
        written.append(Path(trainer.ckpt_path))
    if not written:
        return None
    newest = max(written, key=lambda p: p.stat().st_mtime)
    real = newest.resolve()
    return str(newest) if real == newest.absolute() else f"{newest} ({real.name})"
