"""Repeated and contradicting records, found where a source is read.

Most datasets legitimately repeat things: an image with five captions (COCO), the same
picture in a classification set twice, a prompt asked twice. So a repeat is counted and
reported once per source (a warning naming the first repeat and its original), never
dropped: deduplicating is the user's decision. What cannot both be true, the same image
with two labels, the same clip with two transcripts, is a ``DataError`` naming both places.
"""

from __future__ import annotations

import logging
from typing import Hashable, Iterable

from modalforge.data.errors import DataError

log = logging.getLogger(__name__)


def report_repeats(entries: Iterable[tuple[Hashable, str]], *, what: str, kind: str, note: str = "") -> int:
    """Warn once with the number of entries whose key occurred before in ``entries``; returns that number.

    ``entries`` are ``(key, where)``; ``kind`` names what repeats (``"image-caption pair"``), ``note``
    says why they are kept (the convention of the data)."""
    first: dict[Hashable, str] = {}
    repeats, example = 0, ""
    for key, where in entries:
        if key in first:
            repeats += 1
            example = example or f"{where} repeats {first[key]}"
        else:
            first[key] = where
    if repeats:
        log.warning("%s: %d %s(s) repeat an earlier one, kept%s (first: %s)", what, repeats, kind,
                    f" ({note})" if note else "", example)
    return repeats


def refuse_conflicts(entries: Iterable[tuple[Hashable, Hashable, str]], *, key_name: str, value_name: str,
                     hint: str | None = None) -> None:
    """A ``DataError`` at the first key given two different values; ``entries`` are ``(key, value, where)``."""
    seen: dict[Hashable, tuple[Hashable, str]] = {}
    for key, value, where in entries:
        if key in seen and seen[key][0] != value:
            before, place = seen[key]
            raise DataError(f"{key_name} {key!r} has {value_name} {value!r} here and {before!r} at {place}",
                            source=where, hint=hint)
        seen.setdefault(key, (value, where))
