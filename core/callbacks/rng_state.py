"""Randomness that resumes exactly and differs per rank.

Lightning saves the model, optimizer, loops and data position but not the random number
generators, so a resumed run draws different augmentations, dropout masks, diffusion noise or
sampled completions than the run it continues. This callback:

- **seeds each rank apart** when training starts (``seed + global rank`` for torch, CUDA, numpy
  and Python), after ``configure_model``: models are still built from ``seed`` alone, identical on
  every rank (FSDP2 builds one per rank), while augmentation and sampling differ between ranks;
- **saves every rank's generators** in the checkpoint (gathered to rank zero, which alone writes
  the file under DDP) and restores each rank's own on resume; a rank the checkpoint has no state
  for (more processes than before) is seeded from ``seed + rank``, with a warning;
- **keeps validation out of the training stream**: generators are put back after each validation,
  so a resumed run, which does not repeat the validation the checkpoint was written before, draws
  what the uninterrupted run drew (and turning validation or samples on never changes training);
- **continues the logged step sequence** after a resume: Lightning re-derives its logging step
  (``_batches_that_stepped``) from the loop counters, one too far for a checkpoint written mid-step
  (Ctrl-C, SIGTERM, a crash); at the first batch after a resume it is set back to the global step.

What the torch generator looked like at the end of the last trained batch is what is saved, so a
checkpoint written on Ctrl-C after a batch was fetched but not trained (the data position then
replays that batch, see ``TrainingModule._align_data_position``) still replays it with the same
draws. In data-loader worker processes each item draws from a seed of its own (the epoch's and
its index, ``modalforge.data.item_seed``), so augmentation resumes exactly with
``data.num_workers > 0`` too.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch

from modalforge.scale.ranks import rank_world

#: Seeds of ``seed + rank`` must stay valid for numpy (below 2**32).
_MAX_SEED = 2**32


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's augmentation and sampling: ``seed + rank`` (mod 2**32)."""
    return (int(seed) + int(rank)) % _MAX_SEED


def seed_rank(seed: int, rank: int) -> int:
    """Seed torch (CPU and CUDA), numpy and Python for ``rank``; returns the seed used."""
    value = rank_seed(seed, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # also seeds CUDA (lazily when it is not initialised yet)
    return value


def _cuda_state() -> torch.Tensor | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state()
    return None


def _numpy_state() -> dict[str, Any]:
    # Plain types and tensors only: Lightning loads checkpoints with torch.load(weights_only=True).
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"name": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    key = np.asarray(state["key"].numpy(), dtype=np.uint32)
    np.random.set_state((state["name"], key, state["pos"], state["has_gauss"], state["gauss"]))


def capture() -> dict[str, Any]:
    """This process's generator states (torch CPU and current CUDA device, numpy, Python)."""
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": _cuda_state(), "numpy": _numpy_state(),
            "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next}}


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`capture` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    _set_numpy_state(state["numpy"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


def _loaders(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _loaders(v)]
    if isinstance(node, (list, tuple)):
        return [x for v in node for x in _loaders(v)]
    return [node] if node is not None else []


class RNGState(L.Callback):
    """Per-rank seeds, generator states in checkpoints, validation kept apart; see the module docstring.

    Args:
        seed: the run's ``seed``; rank ``r`` draws from ``seed + r`` when training starts.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._loaded: dict[str, Any] | None = None  # from the checkpoint, applied at on_train_start
        self._torch_at_batch_end: torch.Tensor | None = None
        self._cuda_at_batch_end: torch.Tensor | None = None
        self._before_validation: dict[str, Any] | None = None
        self._fix_log_step = False

    # ---- start ------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        states = (self._loaded or {}).get("ranks") or []
        if self._loaded is not None:
            self._fix_log_step = True
        if rank < len(states) and states[rank] is not None:
            restore(states[rank])
            if len(states) != world and rank == 0:
                warnings.warn(f"[modalforge] the checkpoint holds random states of {len(states)} process(es), this "
                              f"run has {world}: ranks {len(states)}.. are seeded from seed + rank, so "
                              "augmentation and sampling do not repeat the original run's", stacklevel=1)
        else:
            if states and rank == 0:
                warnings.warn(f"[modalforge] the checkpoint holds random states of {len(states)} process(es), this "
                              f"run has {world}: ranks {len(states)}.. are seeded from seed + rank", stacklevel=1)
            seed_rank(self.seed, rank)
        self._loaded = None
        self._own_loader_generators(trainer)  # a resume mid-epoch has no on_train_epoch_start
        self._torch_at_batch_end, self._cuda_at_batch_end = torch.get_rng_state(), _cuda_state()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._own_loader_generators(trainer)

    def _own_loader_generators(self, trainer: L.Trainer) -> None:
        # A DataLoader without its own generator draws its workers' base seed from the global torch
        # generator when its iterator starts, which a resume mid-epoch does at another point of the
        # stream than the original run; its own generator, a function of (seed, rank, epoch), keeps
        # the training stream the same and gives worker seeds that repeat per epoch.
        from torch.utils.data import DataLoader

        seed = rank_seed(self.seed, trainer.global_rank) + 7919 * int(trainer.current_epoch)
        for loader in _loaders(trainer.train_dataloader):
            if isinstance(loader, DataLoader) and getattr(loader, "_modalforge_generator", loader.generator is None):
                loader.generator = torch.Generator().manual_seed(seed % _MAX_SEED)
                loader._modalforge_generator = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._fix_log_step:
            self._fix_log_step = False
            loop = trainer.fit_loop.epoch_loop
            # Lightning adds one to its logging step on restore unless the checkpoint came from the end of
            # a batch; a checkpoint written mid-step (Ctrl-C) then logs one step too far. One optimizer:
            # the logging step of a batch is the number of optimizer steps before it.
            if getattr(loop, "_batches_that_stepped", None) is not None and len(trainer.optimizers) == 1:
                loop._batches_that_stepped = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Cheap (a 5 kB copy): what the next fetch will start from, for a checkpoint written mid-step.
        self._torch_at_batch_end = torch.get_rng_state()
        if self._cuda_at_batch_end is not None:
            self._cuda_at_batch_end = _cuda_state()

    # ---- validation apart -------------------------------------------------------------
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._before_validation = capture()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._before_validation is not None:
            restore(self._before_validation)
            self._before_validation = None

    # ---- checkpoint -------------------------------------------------------------------
    def _own_state(self) -> dict[str, Any]:
        state = self._before_validation if self._before_validation is not None else capture()
        state = dict(state)
        if self._before_validation is None and self._torch_at_batch_end is not None:
            state["torch"] = self._torch_at_batch_end
            if self._cuda_at_batch_end is not None:
                state["cuda"] = self._cuda_at_batch_end
        return state

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while a checkpoint is dumped; under DDP only rank zero writes the file.
        own = self._own_state()
        rank, world = rank_world()
        if world > 1:
            import torch.distributed as dist

            states: list[Any] = [None] * world
            dist.all_gather_object(states, own)
        else:
            states = [own]
        return {"seed": self.seed, "world_size": world, "ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
