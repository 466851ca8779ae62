"""One command-line override (``key=value``, ``+key=value``, ``~key``), as every front-end reads it.

Hydra parses overrides itself; the front-ends (CLI, pipelines, compare, launch, the TRL
translator) only need to know which key an override sets, and used to repeat that parse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


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


_SAFE_STRING = re.compile(r"^[A-Za-z_/.][\w./:@+-]*$")


def hydra_value(value: Any) -> str:
    """A YAML value written in Hydra's override grammar (strings quoted where needed).

    Example:
        ``hydra_value([1, "a b"])`` -> ``[1,'a b']``
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _SAFE_STRING.match(text) and text.lower() not in ("true", "false", "null", "inf", "nan"):
        return text
    # Hydra's quoted strings: a backslash is literal except before a quote or at the end.
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"
