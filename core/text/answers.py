"""The normal form of a short generated answer, for exact-match accuracy (greedy ``val/acc``).

One definition for every plugin that scores answers by exact match, so their ``val/acc`` compare:
trimmed, lower case, a final full stop or exclamation mark dropped, runs of whitespace as one space.
"""

from __future__ import annotations

import re


def normalise_answer(text: str) -> str:
    """``"  The first. "`` and ``"the first"`` are the same answer; ``"3.5"`` stays ``"3.5"``."""
    return " ".join(re.sub(r"[.!]$", "", text.strip()).split()).lower()
