"""wav2vec2 data: raw audio (folders, manifests, shards), random crops, batches of similar length.

No transcripts: clips are cropped at random to ``max_seconds`` and grouped into
batches of similar length (sorted within shuffled mega-batches, as fairseq does)
so little compute goes to padding. Wav2Vec2's feature extractor normalises and pads.
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
from modalforge.data.readers import read_records, require_fields
from modalforge.data.splits import split_train_val
from modalforge.data.synthetic.tones import write_tones
from modalforge.interfaces import DataModule

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


class Wav2Vec2DataModule(DataModule):
    """Unlabelled audio for wav2vec 2.0 pretraining.

    Args:
        train / val: folders of audio files, manifests (``audio_field``), or shards; ``None`` uses the tone demo set.
        audio_field: manifest field with the audio path.
        max_seconds: random crop length. min_seconds: shorter clips are skipped (counted, reported).
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None, audio_field: str = "audio", max_seconds: float = 1.0,
                 min_seconds: float = 0.2, batch_size: int = 16, num_workers: int = 0, val_fraction: float = 0.05,
                 cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.train_spec, self.val_spec, self.audio_field = train, val, audio_field
        self.max_samples, self.min_samples = int(max_seconds * SAMPLE_RATE), int(min_seconds * SAMPLE_RATE)
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        self.cache_dir, self.seed = cache_dir, seed
        self.train_set: ClipBatches | None = None
        self.val_set: ClipBatches | None = None
        self.skipped = 0

    def _synthetic(self) -> Path:
        return ensure_built(cache_root(self.cache_dir) / "synthetic" / "tones-v1", write_tones)

    def prepare_data(self) -> None:
        if self.train_spec is None:
            self._synthetic()

    def _read(self, spec: Any, what: str) -> list[AudioRef]:
        if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec) and not any(
                Path(spec).glob("*.jsonl")):
            clips = [AudioRef(path=str(p)) for p in sorted(Path(spec).rglob("*")) if p.suffix in AUDIO_SUFFIXES]
        else:
            clips = []
            for record in read_records(spec, what=what):
                if record.source.endswith(".tar"):
                    ref = audio_from_sample(record.data, record.where())
                    if ref is None:
                        raise DataError("shard sample has no audio (flac/wav/ogg)", source=record.source,
                                        location=record.location)
                else:
                    require_fields(record, {self.audio_field: str})
                    ref = AudioRef(path=resolve_image_path(record.data[self.audio_field], record.source),
                                   where=record.where())
                clips.append(ref)
        if not clips:
            raise DataError(f"{what}: no audio found in {spec!r}")
        return clips

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

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from transformers import Wav2Vec2FeatureExtractor

        if self.train_spec is None:
            folder = self._synthetic()
            train, val = self._read(str(folder / "train.jsonl"), "data.train"), self._read(
                str(folder / "val.jsonl"), "data.val")
        else:
            train = self._read(self.train_spec, "data.train")
            if self.val_spec is not None:
                val = self._read(self.val_spec, "data.val")
            else:
                train, val = split_train_val(train, val_fraction=self.val_fraction, seed=self.seed)
        self.processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                  do_normalize=True, return_attention_mask=True)
        self.train_set = self._batches(train, self.seed, crop=True)
        self.val_set = self._batches(val, self.seed + 1, crop=False)

    def _collate(self, items: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        waves = [w.numpy() for w in items[0]]
        out = self.processor(waves, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True,
                             return_tensors="pt")
        return {"input_values": out.input_values, "attention_mask": out.attention_mask}

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.train_set, 1, shuffle=True, seed=self.seed, collate_fn=self._collate,
                                   num_workers=self.num_workers)

    def val_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.val_set, 1, shuffle=False, collate_fn=self._collate,
                                   num_workers=self.num_workers)
