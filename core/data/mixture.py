"""A weighted mixture of map-style datasets, deterministic under a seed and resumable.

Each epoch draws ``epoch_size`` examples (by default the sum of the sources'
sizes): source *i* gets a share ``weight_i / sum(weights)`` of them, its own
examples in a fresh permutation (cycled when its share is larger than the
source, so a small source weighted up repeats, a large one weighted down is
subsampled), and the sources are interleaved at random. The order is a pure
function of (seed, epoch), so ``ResumableSampler`` resumes it exactly by
skipping what was consumed. Written by hand: torch has no weighted,
resumable ConcatDataset sampler.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


class MixedDataset(Dataset):
    """Several datasets behind one global index (their concatenation), sampled by weight.

    Args:
        datasets: the sources, each already processed by its plugin.
        weights: positive sampling weights, one per dataset.
        names: source names, for per-source counts.
        epoch_size: examples per epoch; ``None``: the sum of the sources' sizes.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], names: Sequence[str],
                 epoch_size: int | None = None) -> None:
        self.datasets, self.names = list(datasets), list(names)
        total = float(sum(weights))
        self.shares = [w / total for w in weights]
        self.sizes = [len(d) for d in self.datasets]  # type: ignore[arg-type]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.epoch_size = int(epoch_size or self.offsets[-1])

    def __len__(self) -> int:
        return self.epoch_size

    def _locate(self, index: int) -> tuple[int, int]:
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, index - self.offsets[source]

    def __getitem__(self, index: int) -> Any:
        source, local = self._locate(index)
        return self.datasets[source][local]

    def source_name(self, index: int) -> str:
        return self.names[self._locate(index)[0]]

    def quotas(self) -> list[int]:
        """Examples per source in one epoch (largest-remainder rounding of the shares)."""
        raw = [share * self.epoch_size for share in self.shares]
        quotas = [int(x) for x in raw]
        for i in sorted(range(len(raw)), key=lambda i: raw[i] - quotas[i], reverse=True)[: self.epoch_size - sum(quotas)]:
            quotas[i] += 1
        return quotas

    def sample_order(self, generator: torch.Generator, shuffle: bool = True) -> list[int]:
        """One epoch's global indices: each source's quota of its examples, interleaved at random."""
        per_source: list[list[int]] = []
        for i, quota in enumerate(self.quotas()):
            picks: list[int] = []
            while len(picks) < quota:
                size = self.sizes[i]
                perm = torch.randperm(size, generator=generator).tolist() if shuffle else list(range(size))
                picks += [self.offsets[i] + j for j in perm[: quota - len(picks)]]
            per_source.append(picks)
        slots = [i for i, picks in enumerate(per_source) for _ in picks]
        if shuffle:
            slots = [slots[j] for j in torch.randperm(len(slots), generator=generator).tolist()]
        cursors = [0] * len(per_source)
        order = []
        for source in slots:
            order.append(per_source[source][cursors[source]])
            cursors[source] += 1
        return order

    def count_sources(self, indices: Sequence[int]) -> dict[str, int]:
        counts = Counter(self.source_name(i) for i in indices)
        return {name: counts.get(name, 0) for name in self.names}


class MixedStream(IterableDataset):
    """Several streams (``IterableDataset``) interleaved by weight, for sources too large to index.

    Each example comes from a source drawn at random in proportion to its weight (seeded per
    dataloader worker); a source that runs out ends the epoch, as a stream has no length to
    cycle. Like every stream here, a resumed run restarts the sources from their beginning:
    the exact position is kept for map-style data only.

    Args:
        streams: the sources.
        weights: positive sampling weights, one per stream.
        names: source names (``source`` field added to each example when it is a dict).
        seed: the draw's seed.
    """

    def __init__(self, streams: Sequence[IterableDataset], weights: Sequence[float], names: Sequence[str],
                 seed: int = 0) -> None:
        super().__init__()
        self.streams, self.names, self.seed = list(streams), list(names), seed
        total = float(sum(weights))
        self.shares = [w / total for w in weights]

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        generator = torch.Generator().manual_seed(self.seed * 1009 + (info.id if info is not None else 0))
        iterators = [iter(stream) for stream in self.streams]
        probs = torch.tensor(self.shares, dtype=torch.float64)
        while True:
            source = int(torch.multinomial(probs, 1, generator=generator))
            try:
                yield next(iterators[source])
            except StopIteration:
                return
