"""``DataError``: a bad input the user must fix, named by file and location."""

from __future__ import annotations

from modalforge.errors import ModalforgeError


class DataError(ModalforgeError, ValueError):
    """A bad dataset record or data path; the message names file, line (or shard and key) and what was expected.

    Args:
        message: what is wrong and what was expected.
        source: the file or shard, if the error is about one.
        location: ``line 7``, ``row 3``, ``key sample000012``...
        hint: one line on how to fix it.
    """

    def __init__(self, message: str, *, source: str | None = None, location: str | None = None,
                 hint: str | None = None) -> None:
        self.source, self.location, self.detail = source, location, message
        where = ", ".join(x for x in (source, location) if x)
        super().__init__(message, where=where or None, hint=hint)
