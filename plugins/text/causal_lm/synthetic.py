"""The offline demo corpus: short documents with structure a tiny model can learn.

Three kinds of sentence, mixed in each document: a small grammar ("the red fox
sees a small dog ."), counting runs ("count 4 5 6 7 ."), and sums ("3 plus 4 is 7 .").
Grammar gives fast early gains; counting and sums reward a model that learns more.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ADJECTIVES = ["red", "blue", "green", "small", "big", "old", "young", "quiet", "bright", "dark"]
NOUNS = ["fox", "dog", "cat", "bird", "horse", "fish", "child", "robot", "tree", "river"]
VERBS = ["sees", "likes", "follows", "finds", "helps", "watches", "calls", "meets"]
DETERMINERS = ["the", "a", "every", "one"]


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        subject = f"{rng.choice(DETERMINERS)} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        obj = f"{rng.choice(DETERMINERS)} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        return f"{subject} {rng.choice(VERBS)} {obj} ."
    if kind < 0.75:
        start = rng.randint(0, 20)
        return "count " + " ".join(str(i) for i in range(start, start + rng.randint(3, 7))) + " ."
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a} plus {b} is {a + b} ."


def document(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))


def write_corpus(folder: Path, *, num_train: int = 4000, num_val: int = 200, seed: int = 0) -> None:
    """Write ``train.jsonl`` and ``val.jsonl`` (``{"text": ...}`` per line) into ``folder``."""
    rng = random.Random(seed)
    for name, count in (("train.jsonl", num_train), ("val.jsonl", num_val)):
        with (folder / name).open("w", encoding="utf-8") as handle:
            for _ in range(count):
                handle.write(json.dumps({"text": document(rng)}) + "\n")
