"""whisper_asr data: (audio, transcript) manifests or shards -> log-Mel features + decoder tokens.

Audio of any sample rate is resampled to 16 kHz and cut or padded to the model's
window by Whisper's feature extractor. The decoder sequence is
``<|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|> text <|endoftext|>``;
the prompt tokens are never learned (labels -100), only the text and the end token.

What the reader refuses, naming file and line: an empty transcript (an empty target teaches the
model to say nothing), and a WAV file shorter than its header declares (libsndfile reads such a
file as a shorter clip, silently). The header pass (``data.verify``) finds a cut WAV before
training and, with ``data.skip_bad=true``, skips and counts it; met while training it stops the run.

Empty values / truncated media / duplicates / mixed types: a blank transcript or audio path is an
error naming file and line; a blank ``language`` is the default one. A cut WAV, or an unreadable or
empty clip, is found by the header pass and stops the run naming the file (``data.skip_bad=true``:
skipped, counted). A clip listed twice with the same transcript is kept and counted in one warning;
with two different transcripts it is an error naming both lines. A transcript or language that is
not a string is an error.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from modalforge.data.audio import AudioRef, audio_from_sample, audio_problem, load_audio
from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.images import resolve_image_path
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.workers import Workers
from modalforge.data.duplicates import refuse_conflicts, report_repeats
from modalforge.data.readers import Record, optional_text, require_fields, require_text
from modalforge.data.synthetic.tones import write_tones
from modalforge.data.tokenizers import cached_bpe, load_tokenizer
from modalforge.data.verify import verify_media
from modalforge.plugins.audio.whisper_asr.feature_cache import FeatureCache, cache_bytes, cached_features

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
IGNORE = -100
TASK_TOKENS = ["<|startoftranscript|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>", "<|endoftext|>"]


class Utterance:
    __slots__ = ("audio", "text", "language")

    def __init__(self, audio: AudioRef, text: str, language: str) -> None:
        self.audio, self.text, self.language = audio, text, language


def wav_shortfall(ref: AudioRef) -> str | None:
    """What a RIFF/WAVE clip lacks of the data its header declares, or ``None`` (whole, or not a WAV).

    libsndfile sizes a cut WAV from the file's length, so neither its header read nor a decode
    shows the cut: the ``data`` chunk's declared size is compared with the bytes that follow it.
    A size of 0 or 0xFFFFFFFF (a streaming writer that never knew the length) is taken as whole.
    """
    try:
        handle = open(ref.path, "rb") if ref.path is not None else io.BytesIO(ref.data or b"")
    except OSError:
        return None  # a missing file is audio_problem's to report
    with handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        total = handle.seek(0, io.SEEK_END)
        position, byte_rate = 12, 0
        while position + 8 <= total:
            handle.seek(position)
            chunk, size = handle.read(4), struct.unpack("<I", handle.read(4))[0]
            if chunk == b"fmt ":
                body = handle.read(12)
                byte_rate = struct.unpack("<I", body[8:12])[0] if len(body) == 12 else 0
            elif chunk == b"data":
                present = total - position - 8
                if size in (0, 0xFFFFFFFF) or present >= size:
                    return None
                if byte_rate:
                    return (f"truncated audio: {present / byte_rate:.2f} s of the {size / byte_rate:.2f} s its header "
                            "declares (a cut or half-copied file)")
                return f"truncated audio: {present} of the {size} data bytes its header declares (a cut file)"
            position += 8 + size + (size & 1)
    return None


def clip_problem(ref: AudioRef) -> str | None:
    """The header pass's check: unreadable or empty (libsndfile), or a cut WAV."""
    return audio_problem(ref) or wav_shortfall(ref)


def _transcript(text: str, record: Record) -> str:
    text = text.strip()
    if not text:
        raise DataError("empty transcript: an empty target teaches the model to say nothing", source=record.source,
                        location=record.location, hint="fill in the transcript or remove the line")
    return text


def utterance_from_record(record: Record, audio_field: str, text_field: str, default_language: str) -> Utterance:
    if record.source.endswith(".tar"):
        ref = audio_from_sample(record.data, record.where())
        text = next((record.data[k] for k in ("txt", "text", "transcript") if isinstance(record.data.get(k), str)), None)
        if ref is None or text is None:
            raise DataError("shard sample needs audio (flac/wav/...) and a transcript (txt); keys present: "
                            f"{sorted(k for k in record.data if not k.startswith('__'))}",
                            source=record.source, location=record.location)
        meta = record.data.get("json") if isinstance(record.data.get("json"), dict) else {}
        return Utterance(ref, _transcript(text, record), meta.get("language", default_language))
    path = require_text(record, audio_field, "an audio path")
    require_fields(record, {text_field: str})
    ref = AudioRef(path=resolve_image_path(path, record.source), where=record.where())
    return Utterance(ref, _transcript(record.data[text_field], record),
                     optional_text(record, "language") or default_language)


class Utterances(Dataset):
    """``(features [mels, frames], decoder ids, labels)`` per utterance; features from the cache when there is one."""

    def __init__(self, items: list[Utterance], module: "WhisperASRDataModule", train: bool,
                 features: FeatureCache | None = None) -> None:
        self.items, self.module, self.train, self.features = items, module, train, features

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[int], list[int]]:
        item = self.items[index]
        features = self.features[index] if self.features is not None else self.module.features_of(item)
        ids, labels = self.module.decoder_sequence(item.text, item.language)
        return features, ids, labels


class WhisperASRDataModule(SourcedDataModule):
    """Speech recognition data.

    Args:
        train / val: manifests (jsonl/csv: audio path relative to the manifest, transcript, optional
            ``language``), shards (flac/wav + txt), or a weighted mixture of sources; val may be named
            sets; ``None`` generates the tone-digits demo set.
        audio_field / text_field: manifest fields. language: default language code.
        processor: a Whisper checkpoint (hub id or folder) whose tokenizer and feature extractor to use;
            ``None`` trains a BPE on the transcripts and builds a feature extractor from the settings below.
        num_mel_bins / chunk_seconds: feature extractor of a from-scratch model (window length in seconds).
        vocab_size: size of the trained BPE.
        spec_augment: mask random frequency bands and time spans of training features (torchaudio).
        max_label_length: decoder tokens; a longer transcript is an error naming file and line.
        verify: check every clip's header before training (``null``: when the set is small enough to be
            cheap). skip_bad: skip unreadable clips (counted and reported) instead of failing.
        cache_features: compute each set's log-Mel features once and memory-map them (:mod:`.feature_cache`):
            ``true``, ``false``, or ``auto`` (while a set's cache stays under ``max_cache_gb``).
        max_cache_gb: the largest cache ``cache_features=auto`` writes for one set.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    decodes_per_item = True  # each item opens and decodes a file: num_workers=auto uses workers

    def __init__(self, train: Any = None, val: Any = None, audio_field: str = "audio", text_field: str = "text",
                 language: str = "en", processor: str | None = None, num_mel_bins: int = 80, chunk_seconds: int = 2,
                 vocab_size: int = 256, spec_augment: bool = False, max_label_length: int = 64,
                 verify: bool | None = None, skip_bad: bool = False, cache_features: bool | str = "auto",
                 max_cache_gb: float = 8.0, batch_size: int = 16, num_workers: Workers = "auto",
                 val_fraction: float = 0.05, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        self.audio_field, self.text_field, self.language = audio_field, text_field, language
        self.processor_name, self.num_mel_bins, self.chunk_seconds = processor, num_mel_bins, chunk_seconds
        self.vocab_size, self.spec_augment, self.max_label_length = vocab_size, spec_augment, max_label_length
        self.verify, self.skip_bad = verify, skip_bad
        if cache_features not in (True, False, "auto"):
            from modalforge.errors import ConfigError

            raise ConfigError(f"{cache_features!r} is not one of true, false, auto", where="data.cache_features")
        self.cache_features, self.max_cache_gb = cache_features, max_cache_gb
        self.feature_extractor = None

    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "tones-v1", write_tones)
        return str(folder / "train.jsonl"), str(folder / "val.jsonl")

    def parse(self, record: Record) -> Utterance:
        return utterance_from_record(record, self.audio_field, self.text_field, self.language)

    def read(self, spec: Any, what: str) -> list[Utterance]:
        items = super().read(spec, what)
        refuse_conflicts(((u.audio.path, u.text, u.audio.where) for u in items if u.audio.path is not None),
                         key_name="audio", value_name="transcript", hint="give each clip one transcript")
        report_repeats(((u.audio.path or u.audio.where, u.audio.where) for u in items), what=what, kind="clip",
                       note="each copy is trained")
        return verify_media(items, lambda u: clip_problem(u.audio), lambda u: u.audio.describe(), what=what,
                            verify=self.verify, skip_bad=self.skip_bad, kind="audio clip")

    def fit(self, train: list[Utterance]) -> None:
        from transformers import WhisperFeatureExtractor

        if self.processor_name:
            self.processor = load_tokenizer(self.processor_name)
            self.feature_extractor = WhisperFeatureExtractor.from_pretrained(self.processor_name)
            return
        languages = sorted({f"<|{u.language}|>" for u in train} | {f"<|{self.language}|>"})
        self.processor = cached_bpe([u.text for u in train], self.vocab_size, cache_dir=self.cache_dir,
                                    extra_special_tokens=TASK_TOKENS + languages)
        self.feature_extractor = WhisperFeatureExtractor(feature_size=self.num_mel_bins, sampling_rate=SAMPLE_RATE,
                                                         chunk_length=self.chunk_seconds)

    def build(self, items: list[Utterance], what: str) -> Utterances:
        self._check_lengths(items)
        features = None
        if self._caches(len(items), what):
            settings = self.feature_extractor.to_json_string()
            features = cached_features([u.audio for u in items], lambda i: self.features_of(items[i]), settings,
                                       self.cache_dir, what)
        if what.startswith("data.train"):
            self.decodes_per_item = features is None  # cached features are read, not decoded: workers rarely pay
        return Utterances(items, self, what.startswith("data.train"), features)

    def features_of(self, item: Utterance) -> torch.Tensor:
        """One clip's log-Mel features ``[mels, frames]``: decoded, resampled to 16 kHz, cut or padded."""
        cut = wav_shortfall(item.audio)  # data.verify=false, or a file cut since the header pass
        if cut is not None:
            raise DataError(cut, source=item.audio.describe(),
                            hint="replace the file, or skip unreadable files with data.skip_bad=true")
        wave = load_audio(item.audio, SAMPLE_RATE)
        return self.feature_extractor(wave.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features[0]

    def _caches(self, count: int, what: str) -> bool:
        if self.cache_features is False:
            return False
        extractor = self.feature_extractor
        size = cache_bytes(count, extractor.feature_size, extractor.nb_max_frames)
        if self.cache_features == "auto" and size > self.max_cache_gb * 2**30:
            log.info("%s: log-Mel features not cached (%.1f GB > data.max_cache_gb=%s); data.cache_features=true "
                     "caches them anyway", what, size / 2**30, self.max_cache_gb)
            return False
        return True

    def token(self, text: str) -> int:
        index = self.processor.convert_tokens_to_ids(text)
        if index is None or index == self.processor.unk_token_id:
            raise DataError(f"the tokenizer has no token {text!r} (language or task not supported by this model)")
        return index

    def prompt_ids(self, language: str) -> list[int]:
        return [self.token("<|startoftranscript|>"), self.token(f"<|{language}|>"), self.token("<|transcribe|>"),
                self.token("<|notimestamps|>")]

    def end_id(self) -> int:
        return self.token("<|endoftext|>")

    def decoder_sequence(self, text: str, language: str) -> tuple[list[int], list[int]]:
        """Decoder inputs and labels; the language/task/no-timestamps prompt is masked out of the loss."""
        prompt = self.prompt_ids(language)
        body = self.processor(" " + text, add_special_tokens=False)["input_ids"] + [self.end_id()]
        sequence = prompt + body
        labels = [IGNORE] * (len(prompt) - 1) + body
        return sequence[:-1], labels

    def _check_lengths(self, items: list[Utterance]) -> None:
        for item in items:
            ids, _ = self.decoder_sequence(item.text, item.language)
            if len(ids) > self.max_label_length:
                raise DataError(f"transcript of {len(ids)} tokens is longer than data.max_label_length="
                                f"{self.max_label_length}", source=item.audio.describe())

    def _collate(self, items: list[tuple[torch.Tensor, list[int], list[int]]], train: bool) -> dict[str, torch.Tensor]:
        features = torch.stack([f for f, _, _ in items])
        if train and self.spec_augment:
            import torchaudio.transforms as T

            features = T.TimeMasking(time_mask_param=max(1, features.shape[-1] // 10))(
                T.FrequencyMasking(freq_mask_param=max(1, features.shape[1] // 8))(features))
        length = max(len(ids) for _, ids, _ in items)
        pad = self.processor.pad_token_id
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
        for i, (_, seq, lab) in enumerate(items):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, : len(lab)] = torch.tensor(lab)
        return {"input_features": features, "decoder_input_ids": ids, "labels": labels}

    def collate(self, items: list[tuple[torch.Tensor, list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return self._collate(items, True)

    def collate_eval(self, items: list[tuple[torch.Tensor, list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return self._collate(items, False)

    def model_hints(self) -> dict[str, Any]:
        frames = self.feature_extractor.nb_max_frames
        return {"vocab_size": len(self.processor), "pad_token_id": self.processor.pad_token_id,
                "decoder_start_token_id": self.token("<|startoftranscript|>"), "eos_token_id": self.end_id(),
                "num_mel_bins": self.feature_extractor.feature_size, "max_source_positions": frames // 2}

    def save_processor(self, directory: str | Path) -> None:
        self.processor.save_pretrained(str(directory))
        self.feature_extractor.save_pretrained(str(directory))
        Path(directory, "asr_prompt.json").write_text(json.dumps({"language": self.language}))

    def sample_inputs(self, n: int) -> list[int]:
        return list(range(min(n, len(self.val_set))))
