"""Spoken-digit stand-ins: sequences of tones, one frequency per digit, with transcripts.

Each clip is 2-4 digits; digit d is a 0.12 s tone at a fixed pitch of its own (with a
harmonic, a short fade and a little noise), separated by short silences. Clips are
written at mixed sample rates (8, 16 and 22.05 kHz) so resampling is exercised. The
transcript is the digits as words ("three one four"), so ASR has words to get right.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from modalforge.progress import preparing

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RATES = (8000, 16000, 22050)


def tone_clip(digits: list[int], rate: int, rng: random.Random) -> np.ndarray:
    parts = [np.zeros(int(0.05 * rate), dtype=np.float32)]
    for d in digits:
        n = int(0.12 * rate)
        t = np.arange(n) / rate
        freq = 300.0 * (1.25 ** d)  # well separated pitches, all below 4 kHz (8 kHz clips keep them)
        wave = 0.5 * np.sin(2 * math.pi * freq * t) + 0.2 * np.sin(2 * math.pi * 2 * freq * t)
        fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)
        parts.append((wave * fade).astype(np.float32))
        parts.append(np.zeros(int(rng.uniform(0.03, 0.08) * rate), dtype=np.float32))
    clip = np.concatenate(parts)
    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 0.01, clip.shape).astype(np.float32)
    return clip + noise


def write_tones(folder: Path, *, num_train: int = 800, num_val: int = 80, seed: int = 0) -> None:
    """``<split>/<n>.wav`` and ``<split>.jsonl`` manifests (``{"audio", "text", "language"}``)."""
    import soundfile as sf

    rng = random.Random(seed)
    with preparing("writing the synthetic tones demo", total=num_train + num_val, unit="file",
                   cached_in=folder.parent) as progress:
        for split, count in (("train", num_train), ("val", num_val)):
            (folder / split).mkdir(parents=True, exist_ok=True)
            lines = []
            for n in progress.track(range(count)):
                digits = [rng.randrange(10) for _ in range(rng.randint(2, 4))]
                rate = rng.choice(RATES)
                rel = f"{split}/{n:05d}.wav"
                sf.write(str(folder / rel), tone_clip(digits, rate, rng), rate)
                lines.append(json.dumps({"audio": rel, "text": " ".join(WORDS[d] for d in digits), "language": "en"}))
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
