"""Find the largest batch that fits before training starts, and leave the run as if it never looked.

``data.batch_size=auto`` (:mod:`modalforge.batch_size`) runs here, at ``on_fit_start``: the model
is on its device, the optimizer built (its state, allocated at the first step, is what the
trials measure too: a forward/backward alone would find a batch that fails at step 1), and the
train loader not yet made, so Lightning's loaders are built once, with the found size.

Each trial sets ``datamodule.batch_size`` (every DataModule's loaders read it), takes
``steps`` batches from a fresh train loader and runs the objective's step, backward and the
optimizer step, in the trainer's precision. An out-of-memory (CUDA, the CPU allocator, or
``MemoryError``: :func:`~modalforge.callbacks.out_of_memory.out_of_memory_cause`) is a
"does not fit"; any other error ends the run as usual.

Afterwards everything a trial touched is put back: the weights, buffers and extra states
(``state_dict``, copied to the host), each module's train/eval mode and plain counters, the
optimizer (its state, empty before the first step), gradients and the random generators. The
data order does not depend on the search either: the loaders draw it from (seed, epoch). Not
used by a resume (the checkpoint's value is reused, see ``run``) nor under several processes
(``run`` refuses that in one line: a rank that runs out of memory alone would leave the
others waiting in a collective).

Lightning's ``BatchSizeFinder`` is not used: it misses ``MemoryError`` and the other
allocator messages, returns a cap it never tried, fails on a size above the data set's, and
leaves the random generators and counters where its trials left them.
"""

from __future__ import annotations

import gc
import traceback
from typing import Any

import lightning as L
import torch

from modalforge.batch_size import DEFAULT_MAX, Found, search
from modalforge.callbacks import rng_state
from modalforge.callbacks.out_of_memory import OutOfMemory, out_of_memory_cause, switches

_PLAIN = (bool, int, float, str, type(None))


class BatchSizeSearch(L.Callback):
    """Search ``data.batch_size`` at fit start (``search=True``); record the size used in checkpoints.

    Args:
        search: search now (``data.batch_size=auto`` on a fresh run); ``False`` only records.
        max_batch_size: the cap (``data.max_batch_size``); the training set's size caps it too.
        mode: ``power`` (powers of two) or ``binsearch`` (then bisect up to the first failure).
        steps: batches per trial (2: the second step is the first with the optimizer state allocated).
    """

    def __init__(self, search: bool = True, max_batch_size: int | None = None, mode: str = "power",
                 steps: int = 2) -> None:
        self.search, self.max_batch_size, self.mode, self.steps = search, max_batch_size, mode, steps
        self.found: Found | None = None
        self.batch_size: int | None = None

    @property
    def state_key(self) -> str:
        return "BatchSizeSearch"

    def state_dict(self) -> dict[str, Any]:
        size = self.batch_size
        return {"batch_size": size} if size is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch_size = state_dict.get("batch_size", self.batch_size)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not self.search or datamodule is None:
            self.batch_size = getattr(datamodule, "batch_size", None)
            return
        items = _train_items(datamodule)
        limits = [(items, "the training set's size"), (self.max_batch_size, "data.max_batch_size"),
                  (DEFAULT_MAX, "the default cap")]
        cap, cap_name = min((n, name) for n, name in limits if n is not None)
        saved = _snapshot(pl_module, trainer.optimizers)
        try:
            found = search(lambda size: self._fits(trainer, pl_module, datamodule, size), cap, self.mode,
                           cap_name=cap_name)
        finally:
            _restore(pl_module, trainer.optimizers, saved)
        if found.size == 0:
            datamodule.batch_size = 1
            fits = switches(getattr(pl_module, "run_config", None) or {}, trainer)
            tried = ", ".join(str(size) for size, _ in found.tried)
            raise OutOfMemory(f"even a batch of 1 ran out of memory (tried {tried})",
                              where="data.batch_size=auto",
                              hint="use less memory per step: " + ", or ".join(fits) if fits else
                              "use a smaller model, or more memory")
        datamodule.batch_size = self.batch_size = found.size
        self.found = found
        if trainer.is_global_zero:
            print(found.line(), flush=True)

    def _fits(self, trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any, size: int) -> bool:
        datamodule.batch_size = size
        try:
            _trial(trainer, pl_module, datamodule, self.steps)
            return True
        except BaseException as err:  # noqa: BLE001 - only an out-of-memory is an answer; the rest goes on
            if out_of_memory_cause(err) is None:
                raise
            traceback.clear_frames(err.__traceback__)  # the failed step's activations live in its frames
            return False
        finally:
            pl_module.zero_grad(set_to_none=True)
            for optimizer in trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _train_items(datamodule: Any) -> int | None:
    """Examples in the training set (a batch cannot be larger), or ``None`` for a stream."""
    try:
        return len(datamodule.train_dataloader().dataset)
    except TypeError:
        return None


def _trial(trainer: L.Trainer, pl_module: L.LightningModule, datamodule: Any, steps: int) -> None:
    """``steps`` training steps of the current batch size: the objective's step, backward, optimizer step."""
    objective = getattr(pl_module, "objective", None)
    step = objective.training_step if objective is not None else (lambda b: pl_module.training_step(b, 0))
    batches = iter(datamodule.train_dataloader())
    try:
        for _ in range(steps):
            batch = next(batches, None)
            if batch is None:
                return
            batch = trainer.strategy.batch_to_device(batch)
            with trainer.precision_plugin.train_step_context():
                out = step(batch)
            loss = getattr(out, "loss", out)
            loss.backward()
            del batch, out, loss
            for optimizer in trainer.optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        del batches  # stops the trial loader's workers


def _snapshot(pl_module: L.LightningModule, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    import copy

    return {
        "weights": {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                    for k, v in pl_module.state_dict().items()},
        "plain": [{k: v for k, v in vars(m).items() if isinstance(v, _PLAIN) and not k.startswith("__")}
                  for m in pl_module.modules()],
        "optimizers": [copy.deepcopy(o.state_dict()) for o in optimizers],
        "rng": rng_state.capture(),
    }


def _restore(pl_module: L.LightningModule, optimizers: list[torch.optim.Optimizer], saved: dict[str, Any]) -> None:
    with torch.no_grad():
        pl_module.load_state_dict(saved["weights"], strict=True)
    for module, plain in zip(pl_module.modules(), saved["plain"]):
        vars(module).update(plain)  # train/eval mode (``training``) and counters a step may have moved
    for optimizer, state in zip(optimizers, saved["optimizers"]):
        optimizer.load_state_dict(state)  # before the first step: no state, so the trials' is freed
    rng_state.restore(saved["rng"])
