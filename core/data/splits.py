"""A validation split made from the training data when none is given."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

from modalforge.data.errors import DataError

T = TypeVar("T")


def split_train_val(records: Sequence[T], *, val_fraction: float = 0.05, min_val: int = 1,
                    max_val: int | None = None, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic, disjoint split: the same seed always holds out the same records."""
    if len(records) < 2:
        raise DataError(f"cannot hold out a validation split from {len(records)} record(s); give data.val")
    size = max(min_val, int(round(len(records) * val_fraction)))
    if max_val is not None:
        size = min(size, max_val)
    size = min(size, len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:size])
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val
