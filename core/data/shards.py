"""Streaming webdataset shards, split by node and by dataloader worker.

For shard sets too large to read up front. Each DDP rank gets a disjoint subset
of shards (``split_by_node``) and each worker of that rank a disjoint subset of
those (``split_by_worker``), so no sample is seen twice per epoch; give at least
``world_size * num_workers`` shards.
"""

from __future__ import annotations

from typing import Sequence

from modalforge.data.paths import expand_paths
from modalforge.data.readers import Record, decode_sample


def webdataset_stream(urls: str | Sequence[str], *, shuffle: int = 0, seed: int = 0, split_by_node: bool = True,
                      split_by_worker: bool = True, what: str = "data.train"):  # noqa: ANN201 - wds pipeline
    """An ``IterableDataset`` of ``Record`` over shards (local paths, globs or brace ranges)."""
    import webdataset as wds

    shards = expand_paths(urls, what=what, suffixes=(".tar",))
    dataset = wds.WebDataset(
        shards,
        shardshuffle=shuffle if shuffle else False,
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker if split_by_worker else None,
        seed=seed,
        empty_check=False,
    )
    if shuffle:
        dataset = dataset.shuffle(shuffle)
    return dataset.map(lambda s: Record(decode_sample(s), s.get("__url__", "?"), f"key {s.get('__key__', '?')}"))
