"""Augmentation in data-loader workers that resumes exactly: each item draws from its own seed.

Without workers, augmentation draws from the process's generators, which checkpoints hold
(``RNGState``), so a resume mid-epoch repeats it. A worker process draws from its own stream
instead, seeded once per epoch; a run resumed mid-epoch skips the consumed indices without
fetching them (``ResumableSampler``), so every later item would get other draws than in the run
it continues, and which worker fetches which item depends on timing. Here, in a worker, each item
reseeds torch, numpy and Python from (the epoch's base seed, the item's index) before it is read:
its crops and flips are a function of the epoch and the item alone, whichever worker fetches it
and however many items came before. Written by hand: torch has no per-item seeding.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

_MAX_SEED = 2**32


def item_seed(base_seed: int, index: int) -> int:
    """The seed of one item in one epoch (Python hashes a tuple of ints the same in every process)."""
    return hash((int(base_seed), int(index))) % _MAX_SEED


class SeededItems(Dataset):
    """``dataset`` whose items, read in a worker process, each draw from their own seed.

    The epoch's base seed is what torch gave the worker (``seed - id``: the loader's generator drew
    it when the epoch's iterator started, and ``RNGState`` makes that generator a function of
    seed, rank and epoch). In the main process (``num_workers=0``) items draw from the process's
    own, checkpointed stream, untouched. Other attributes are the wrapped dataset's.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        info = get_worker_info()
        if info is not None:
            seed = item_seed(info.seed - info.id, index)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)
