"""Dataloaders that shard by rank and resume mid-epoch.

Lightning restores the step, optimizer and scheduler, but a plain DataLoader
restarts its epoch from the first batch, so a resumed run would see some
examples twice and others never. Lightning saves the ``state_dict`` of any
dataloader that has one (``_Stateful``) in the checkpoint and restores it on
resume; ``ResumableDataLoader`` uses that hook to skip exactly the batches the
interrupted run had consumed. Written by hand: torch's ``DistributedSampler``
cannot start mid-epoch and torchdata's StatefulDataLoader is not a dependency.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from modalforge.data.item_seed import SeededItems
from modalforge.scale.ranks import rank_world


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, sharded across ranks, that can start at an offset.

    Every rank gets ``ceil(n / world)`` indices (padded by wrapping, like
    ``DistributedSampler``). ``set_epoch`` is called by Lightning at each epoch.
    """

    def __init__(self, data_source: Sized, *, shuffle: bool = True, seed: int = 0) -> None:
        self.data_source = data_source
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        self._skip_epoch: int | None = None
        self.current: list[int] = []  # this rank's order of the running epoch

    def set_epoch(self, epoch: int) -> None:
        if self._skip_epoch is not None and epoch != self._skip_epoch:
            self.skip, self._skip_epoch = 0, None
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        """Start ``epoch`` after its first ``skip`` indices (of this rank)."""
        self.epoch, self.skip, self._skip_epoch = epoch, skip, epoch

    def _indices(self) -> list[int]:
        n = len(self.data_source)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if hasattr(self.data_source, "sample_order"):  # a MixedDataset: weighted, still a function of (seed, epoch)
            order = self.data_source.sample_order(generator, shuffle=self.shuffle)
        elif self.shuffle:
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        rank, world = rank_world()
        per_rank = -(-n // world)
        padded = order + order[: per_rank * world - n]
        return padded[rank::world]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()
        self.current = indices
        skip, self.skip, self._skip_epoch = self.skip, 0, None
        return iter(indices[skip:])

    def __len__(self) -> int:
        _, world = rank_world()
        return -(-len(self.data_source) // world)


def _check_enough(per_rank: int, batch_size: int, drop_last: bool, what: str) -> None:
    """Too little data for one batch is an error with both numbers, never Lightning's silent "no batches"."""
    from modalforge.data.errors import DataError

    _, world = rank_world()
    ranks = f" per process ({world} processes)" if world > 1 else ""
    if per_rank == 0:
        raise DataError(f"{what} holds no examples{ranks} after reading and filtering", hint="check the data source "
                        "and filters (too_long=drop, skip_bad...)")
    if drop_last and per_rank < batch_size:
        raise DataError(f"{what} yields {per_rank} example(s){ranks} (after packing or dropping), fewer than "
                        f"data.batch_size={batch_size}, so not one full batch", hint=f"lower data.batch_size "
                        f"(at most {per_rank}) or give more data")


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler`` whose position is saved in checkpoints."""

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0,
                 drop_last: bool = False, pin_memory: bool = False, what: str | None = None, **kwargs: Any) -> None:
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
        _check_enough(len(sampler), batch_size, drop_last, what or ("data.train" if shuffle else "data.val"))
        if num_workers and not isinstance(dataset, SeededItems):  # each item its own seed: exact resume
            dataset = SeededItems(dataset)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                         num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory,
                         persistent_workers=False, **kwargs)
        self.batches_yielded = 0
        self._counted: tuple[list[int] | None, int, dict[str, int]] = (None, 0, {})

    def __iter__(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        self.batches_yielded = sampler.skip // self.batch_size if sampler.skip else 0
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def source_counts(self) -> dict[str, int] | None:
        """Examples drawn from each source of a mixture so far this epoch (``None`` for one source)."""
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if not hasattr(self.dataset, "count_sources"):
            return None
        # counted incrementally: a log step costs the batches since the last one, not the whole epoch so far
        consumed = self.batches_yielded * int(self.batch_size or 1)
        order, start, counts = getattr(self, "_counted", (None, 0, {}))
        if order is not sampler.current or consumed < start:
            order, start, counts = sampler.current, 0, {}
        for name, n in self.dataset.count_sources(order[start:consumed]).items():
            counts[name] = counts.get(name, 0) + n
        self._counted = (order, consumed, counts)
        return dict(counts)

    def state_dict(self) -> dict[str, Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {"epoch": sampler.epoch, "batches_yielded": self.batches_yielded, "seed": sampler.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        sampler.seed = state.get("seed", sampler.seed)
        sampler.resume(int(state["epoch"]), int(state["batches_yielded"]) * int(self.batch_size or 1))
