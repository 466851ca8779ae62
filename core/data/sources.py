"""Data sources as the user writes them: one path, several paths, a weighted mixture, named validation sets.

``data.train`` may be
- a path, glob, brace range, folder, ``hf:`` dataset, or a list of those: one source;
- a list of mappings ``{path: ..., weight: 3, name: web}`` (strings allowed beside them,
  weight 1): a weighted mixture, each source read and processed on its own and
  sampled in proportion to its weight. A DataModule may accept options per source
  (its ``source_options``, such as a column mapping): they ride along in ``Source.options``.

``data.val`` may be one spec (one set, logged as ``val/...``), or a mapping
``{name: spec}`` / a list of ``{name:, path:}``: several sets, each logged as
``val/<name>/...``.

Empty values / truncated media / duplicates / mixed types: sources read no records (the readers
and plugins judge those). An empty ``data.train`` string is an error; two sources or validation
sets under one name are an error; one file in two sources is allowed (each source is read on its
own: that is how a mixture weights it), while one file named twice inside a source is an error
(:func:`~modalforge.data.paths.expand_paths`). A weight that is not a number > 0 is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from modalforge.errors import ConfigError

_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Source:
    """One source of a mixture: what to read, its sampling weight, and the name it is logged under."""

    spec: Any
    weight: float = 1.0
    name: str = "train"
    what: str = "data.train"
    #: the DataModule's own per-source options (only the keys it declares in ``source_options``)
    options: Mapping[str, Any] = field(default_factory=dict)


def _name_of(spec: Any, index: int) -> str:
    text = spec if isinstance(spec, str) else (spec[0] if isinstance(spec, (list, tuple)) and spec else f"source{index}")
    stem = os.path.basename(str(text).rstrip("/")).split(".")[0] or f"source{index}"
    return _NAME.sub("_", stem)[:40] or f"source{index}"


def parse_train(spec: Any, key: str = "data.train", options: Sequence[str] = ()) -> list[Source]:
    """The training sources of ``spec`` (empty when ``spec`` is ``None``: the plugin's synthetic default);
    ``options``: the per-source keys the DataModule takes besides path, weight and name."""
    if spec is None:
        return []
    if isinstance(spec, Mapping):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not any(isinstance(item, Mapping) for item in spec):
        return [Source(spec=spec, name="train", what=key)]
    sources: list[Source] = []
    for i, item in enumerate(spec):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping) or "path" not in item:
            raise ConfigError("a mixture source needs a 'path' (and optionally 'weight' and 'name')", where=where)
        unknown = sorted(set(item) - {"path", "weight", "name", *options})
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} (a source has path, weight, name"
                              + "".join(f", {o}" for o in options) + ")", where=where)
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"weight {weight!r} must be a number > 0 (drop the source to leave it out)",
                              where=f"{where}.weight")
        name = str(item.get("name") or _name_of(item["path"], i))
        sources.append(Source(spec=item["path"], weight=float(weight), name=name, what=f"{where} ({name})",
                              options={k: item[k] for k in options if k in item}))
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two sources are named {duplicates[0]!r}: give each a distinct 'name'", where=key)
    return sources


def parse_val(spec: Any, key: str = "data.val") -> dict[str, Any]:
    """Named validation sets of ``spec``: ``{}`` (split from train), ``{"val": spec}``, or several."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        if "path" in spec:
            return {str(spec.get("name") or "val"): spec["path"]}
        return {str(name): value for name, value in spec.items()}
    if isinstance(spec, (list, tuple)) and any(isinstance(item, Mapping) for item in spec):
        sets: dict[str, Any] = {}
        for i, item in enumerate(spec):
            if not isinstance(item, Mapping) or "path" not in item:
                raise ConfigError("a named validation set is {name: ..., path: ...}", where=f"{key}[{i}]")
            name = str(item.get("name") or _name_of(item["path"], i))
            if name in sets:
                raise ConfigError(f"two validation sets are named {name!r}", where=key)
            sets[name] = item["path"]
        return sets
    return {"val": spec}


def describe(sources: Sequence[Source]) -> str:
    total = sum(s.weight for s in sources)
    return ", ".join(f"{s.name} {100 * s.weight / total:.0f}%" for s in sources)
