"""Log-Mel features computed once and memory-mapped: repeated epochs decode and transform no audio.

Decoding and resampling a clip and running Whisper's feature extractor cost 39-59% of a step on a
2-core machine (``benchmarks/loader_throughput.py``). Features depend only on the clip and the
extractor's settings, so a set's features are written once to ``<cache>/whisper-features/<key>/``
as one ``.npy`` array (float32: the same numbers as computing them again) and read back through a
memory map, by any number of ranks and loader workers. The key covers every clip's identity (path,
size and mtime, or the bytes of a shard's clip), their order and the extractor's settings, so a
changed file or setting builds another cache. SpecAugment masks features at collate time, after
the cache, so it still draws new masks every step.

Hand-written: ``datasets``' map-and-cache would need the records as a ``datasets.Dataset``; here
they are already parsed (errors naming file and line), and a flat array is all a step needs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from modalforge.data.cache import cache_root, ensure_built
from modalforge.progress import preparing

FILE = "features.npy"


def cache_key(audio: Sequence[Any], settings: str) -> str:
    """Digest of the clips (in order: identity, size, mtime or bytes) and the feature extractor's settings."""
    digest = hashlib.sha256(settings.encode())
    for ref in audio:
        digest.update(ref.describe().encode())
        if ref.path is not None and os.path.exists(ref.path):
            stat = os.stat(ref.path)
            digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
        elif getattr(ref, "data", None) is not None:
            digest.update(hashlib.sha256(ref.data).digest())
    return digest.hexdigest()[:20]


class FeatureCache:
    """The cached features of one set, opened lazily (a memory map per process: loader workers too)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._array: np.ndarray | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return torch.from_numpy(np.array(self._array[index]))

    def __getstate__(self) -> dict[str, Any]:  # workers open their own map
        return {"path": self.path, "_array": None}


def cached_features(audio: Sequence[Any], compute: Callable[[int], torch.Tensor], settings: str,
                    cache_dir: str | None, what: str) -> FeatureCache:
    """The features of every clip of a set, computing them (``compute(index)``) only if not cached yet."""
    folder = cache_root(cache_dir) / "whisper-features" / cache_key(audio, settings)

    def build(tmp: Path) -> None:
        with preparing(f"whisper_asr {what}: log-Mel features, once", total=len(audio), unit="clip",
                       cached_in=folder.parent) as progress:
            first = compute(0).numpy()
            array = np.lib.format.open_memmap(tmp / FILE, mode="w+", dtype=np.float32, shape=(len(audio), *first.shape))
            array[0] = first
            progress.update(1)
            for index in range(1, len(audio)):
                array[index] = compute(index).numpy()
                progress.update(1)
            array.flush()
            del array
            progress.summary = f"{len(audio)} clips x {tuple(first.shape)} float32 in {folder}"

    return FeatureCache(ensure_built(folder, build) / FILE)


def cache_bytes(count: int, mels: int, frames: int) -> int:
    """What the cache of ``count`` clips takes on disk (float32)."""
    return count * mels * frames * 4
