"""The offline demo: beeps clips ("how many beeps?" -> one..four) and short tone-digit transcripts.

Clips come from the core's tone generator (:func:`modalforge.data.synthetic.tones.tone_clip`, the one
behind whisper_asr's demo): ``n`` beeps are ``n`` repeats of one digit's tone (pitch drawn per clip), so
the count, not the pitch, is the answer; a transcript clip is 1-2 digits said as words.
Chance on the counting question is 1/4.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from modalforge.data.synthetic.tones import WORDS, tone_clip
from modalforge.progress import preparing

COUNTS = ["one", "two", "three", "four"]
COUNT_QUESTION = "How many beeps?"
RATE = 16000  # the model's rate: no resampling per item (whisper_asr's demo exercises mixed rates)


def demo_records(rng: random.Random, kind: str) -> tuple[list[int], dict[str, str]]:
    """Digits of one clip and its record fields (without ``audio``)."""
    if kind == "beeps":
        n = rng.randint(1, 4)
        return [rng.randrange(10)] * n, {"question": COUNT_QUESTION, "answer": COUNTS[n - 1]}
    digits = [rng.randrange(10) for _ in range(rng.randint(1, 2))]
    return digits, {"transcript": " ".join(WORDS[d] for d in digits)}


def write_audio_lm_sets(folder: Path, *, num_train: int = 600, num_val: int = 64, seed: int = 0) -> None:
    """``<split>/<n>.wav``, ``beeps_<split>.jsonl`` (counting only) and ``mixed_<split>.jsonl`` (2/3 counting)."""
    import soundfile as sf

    rng = random.Random(seed)
    with preparing("writing the synthetic beeps demo", total=num_train + num_val, unit="file",
                   cached_in=folder.parent) as progress:
        for split, count in (("train", num_train), ("val", num_val)):
            (folder / split).mkdir(parents=True, exist_ok=True)
            beeps, mixed = [], []
            for n in progress.track(range(count)):
                kind = "transcript" if n % 3 == 2 else "beeps"
                digits, fields = demo_records(rng, kind)
                rel = f"{split}/{n:05d}.wav"
                sf.write(str(folder / rel), tone_clip(digits, RATE, rng), RATE)
                line = json.dumps({"audio": rel, **fields})
                mixed.append(line)
                if kind == "beeps":
                    beeps.append(line)
            (folder / f"beeps_{split}.jsonl").write_text("\n".join(beeps) + "\n")
            (folder / f"mixed_{split}.jsonl").write_text("\n".join(mixed) + "\n")
