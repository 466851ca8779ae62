"""Read audio files or shard bytes as mono float tensors at a target rate, naming the file on errors.

Decoding uses ``soundfile`` (libsndfile: wav, flac, ogg); resampling uses
torchaudio's ``functional.resample`` (torchaudio's own loader needs torchcodec).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import torch

from modalforge.data.errors import DataError

AUDIO_KEYS = ("flac", "wav", "ogg", "mp3", "audio")
log = logging.getLogger(__name__)
_WARNED_SHORT: set[str] = set()


@dataclass(frozen=True)
class AudioRef:
    """Where a clip is: a file path, or bytes from a shard sample (``where`` names shard and key)."""

    path: str | None = None
    data: bytes | None = None
    where: str = ""

    def describe(self) -> str:
        return self.path or self.where


def load_audio(ref: AudioRef, sample_rate: int) -> torch.Tensor:
    """``[samples]`` float32 mono at ``sample_rate``; an unreadable or empty clip is a ``DataError``."""
    import soundfile as sf
    import torchaudio.functional as AF

    try:
        source = ref.path if ref.path is not None else io.BytesIO(ref.data or b"")
        declared = sf.info(source).frames
        if not isinstance(source, str):
            source.seek(0)
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise DataError("audio file not found", source=ref.describe()) from None
    except Exception as err:  # noqa: BLE001 - libsndfile errors name no file
        if ref.path is not None and not os.path.exists(ref.path):
            raise DataError("audio file not found", source=ref.describe()) from None
        raise DataError(f"unreadable audio ({type(err).__name__}: {err})", source=ref.describe()) from None
    if data.shape[0] == 0:
        raise DataError("empty audio (0 samples)", source=ref.describe())
    if 0 < declared and data.shape[0] < declared and ref.describe() not in _WARNED_SHORT:
        _WARNED_SHORT.add(ref.describe())
        log.warning("%s: %d audio frames where its header says %d (truncated file?); training on what is there",
                    ref.describe(), data.shape[0], declared)
    wave = torch.from_numpy(data).mean(dim=1)
    return AF.resample(wave, rate, sample_rate) if rate != sample_rate else wave


def audio_problem(ref: AudioRef) -> str | None:
    """What is wrong with a clip, by reading its header only (libsndfile), or ``None`` if it reads."""
    import soundfile as sf

    try:
        info = sf.info(ref.path if ref.path is not None else io.BytesIO(ref.data or b""))
    except FileNotFoundError:
        return "audio file not found"
    except Exception as err:  # noqa: BLE001 - libsndfile errors name no file
        if ref.path is not None and not os.path.exists(ref.path):
            return "audio file not found"
        return f"unreadable audio ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if info.frames == 0:
        return "empty audio (0 samples)"
    return None


def audio_from_sample(sample: dict, where: str) -> AudioRef | None:
    """The audio of a webdataset sample (``flac``/``wav``/... key), if it has one."""
    for key in AUDIO_KEYS:
        if isinstance(sample.get(key), bytes):
            return AudioRef(data=sample[key], where=where)
    return None
