"""One command-line override (``key=value``, ``+key=value``, ``~key``), as every front-end reads it.

Hydra parses overrides itself; the front-ends (CLI, pipelines, compare, launch, the TRL
translator) only need to know which key an override sets, and used to repeat that parse.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Override:
    """An override as written: ``prefix`` (``+`` add, ``++`` force-add, ``~`` delete, or none), key, value."""

    text: str

    @property
    def key(self) -> str:
        return self.text.split("=", 1)[0].lstrip("+~")

    @property
    def value(self) -> str | None:
        return self.text.split("=", 1)[1] if "=" in self.text else None

    @property
    def prefix(self) -> str:
        head = self.text.split("=", 1)[0]
        return head[:len(head) - len(head.lstrip("+~"))]


def override_key(text: str) -> str:
    """The key an override sets: ``+trainer.devices=2`` -> ``trainer.devices``."""
    return Override(text).key
