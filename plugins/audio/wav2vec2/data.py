"""wav2vec2 data: raw audio (folders, manifests, shards), random crops, batches of similar length.

No transcripts: clips are cropped at random to ``max_seconds`` and grouped into
batches of similar length (sorted within shuffled mega-batches, as fairseq does)
so little compute goes to padding. Wav2Vec2's feature extractor normalises and pads.

Empty values / truncated media / duplicates / mixed types: a blank audio path is an error naming
file and line; an unreadable or empty clip stops the run naming the file; a clip shorter than
``data.min_seconds`` is skipped and counted. A WAV shorter than its header declares is a warning
naming the file, and what is there is trained. A clip listed twice is kept and counted in one
warning. An audio path that is not a string is an error.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from modalforge.data.audio import AudioRef, audio_from_sample, load_audio
from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.images import resolve_image_path
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.workers import Workers
from modalforge.data.duplicates import report_repeats
from modalforge.data.readers import Record, read_records, require_text
from modalforge.data.synthetic.tones import write_tones

SAMPLE_RATE = 16000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def length_buckets(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """Index batches of similar length: shuffle, cut into mega-batches, sort each by length, slice."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * mega):
        chunk = sorted(order[start:start + batch_size * mega], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return batches


class ClipBatches(Dataset):
    """Each item is one pre-formed batch of randomly cropped waveforms."""

    def __init__(self, clips: list[AudioRef], batches: list[list[int]], max_samples: int, crop: bool) -> None:
        self.clips, self.batches, self.max_samples, self.crop = clips, batches, max_samples, crop

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        waves = []
        for i in self.batches[index]:
            wave = load_audio(self.clips[i], SAMPLE_RATE)
            if len(wave) > self.max_samples:
                start = int(torch.randint(0, len(wave) - self.max_samples + 1, ()).item()) if self.crop else 0
                wave = wave[start:start + self.max_samples]
            waves.append(wave)
        return waves


class Wav2Vec2DataModule(SourcedDataModule):
    """Unlabelled audio for wav2vec 2.0 pretraining.

    Args:
        train / val: folders of audio files, manifests (``audio_field``), shards, or a weighted mixture of
            sources; val may be named sets; ``None`` uses the tone demo set.
        audio_field: manifest field with the audio path.
        max_seconds: random crop length. min_seconds: shorter clips are skipped (counted, reported).
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    drop_last_train = False  # items are whole length-bucketed batches already

    def __init__(self, train: Any = None, val: Any = None, audio_field: str = "audio", max_seconds: float = 1.0,
                 min_seconds: float = 0.2, batch_size: int = 16, num_workers: Workers = "auto", val_fraction: float = 0.05,
                 cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        self.audio_field = audio_field
        self.max_samples, self.min_samples = int(max_seconds * SAMPLE_RATE), int(min_seconds * SAMPLE_RATE)
        self.skipped = 0

    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "tones-v1", write_tones)
        return str(folder / "train.jsonl"), str(folder / "val.jsonl")

    def read(self, spec: Any, what: str) -> list[AudioRef]:
        if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec) and not any(
                Path(spec).glob("*.jsonl")):
            clips = [AudioRef(path=str(p)) for p in sorted(Path(spec).rglob("*")) if p.suffix in AUDIO_SUFFIXES]
        else:
            clips = [self.parse(record) for record in read_records(spec, what=what)]
        if not clips:
            raise DataError(f"{what}: no audio found in {spec!r}")
        report_repeats(((c.path or c.where, c.where or c.describe()) for c in clips), what=what, kind="clip",
                       note="each copy is trained")
        return clips

    def parse(self, record: Record) -> AudioRef:
        if record.source.endswith(".tar"):
            ref = audio_from_sample(record.data, record.where())
            if ref is None:
                raise DataError("shard sample has no audio (flac/wav/ogg)", source=record.source,
                                location=record.location)
            return ref
        path = require_text(record, self.audio_field, "an audio path")
        return AudioRef(path=resolve_image_path(path, record.source), where=record.where())

    def fit(self, train_items: list[AudioRef]) -> None:
        from transformers import Wav2Vec2FeatureExtractor

        self.processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                  do_normalize=True, return_attention_mask=True)

    def build(self, items: list[AudioRef], what: str) -> ClipBatches:
        train = what.startswith("data.train")
        return self._batches(items, self.seed if train else self.seed + 1, crop=train)

    def _batches(self, clips: list[AudioRef], seed: int, crop: bool) -> ClipBatches:
        lengths = []
        kept = []
        for ref in clips:
            n = min(len(load_audio(ref, SAMPLE_RATE)), self.max_samples)
            if n < self.min_samples:
                self.skipped += 1
                continue
            kept.append(ref)
            lengths.append(n)
        if not kept:
            raise DataError("every clip is shorter than data.min_seconds")
        return ClipBatches(kept, length_buckets(lengths, self.batch_size, seed), self.max_samples, crop)

    def collate(self, items: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        waves = [w.numpy() for w in items[0]]
        out = self.processor(waves, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True,
                             return_tensors="pt")
        return {"input_values": out.input_values, "attention_mask": out.attention_mask}

    _collate = collate

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.train_set, 1, shuffle=True, seed=self.seed, collate_fn=self.collate,
                                   num_workers=self.num_workers, what="data.train")

    def val_dataloader(self) -> ResumableDataLoader | list[ResumableDataLoader]:
        self.setup()
        loaders = [ResumableDataLoader(dataset, 1, shuffle=False, collate_fn=self.collate,
                                       num_workers=self.num_workers, what=f"data.val ({name})")
                   for name, dataset in self.val_sets.items()]
        return loaders[0] if len(loaders) == 1 else loaders
