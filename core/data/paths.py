"""Expand a data spec (path, glob, brace range, folder, list) into files, or say which key is wrong."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from braceexpand import braceexpand

from modalforge.data.errors import DataError

KNOWN_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".tar", ".jsonl.gz", ".txt.gz")


def _has_suffix(path: str, suffixes: Sequence[str]) -> bool:
    return any(path.endswith(s) for s in suffixes)


def is_hf_dataset_dir(path: str | Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    path = Path(path)
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def expand_paths(spec: str | Sequence[str] | None, *, what: str = "data.train",
                 suffixes: Sequence[str] | None = None) -> list[str]:
    """Files named by ``spec``: a path, a glob, a brace range (``shard-{000..099}.tar``), a folder, or a list.

    Folders are searched recursively for files with a known suffix. Anything that
    matches nothing is an error naming ``what`` (the config key to fix).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise DataError(f"{what} is not set: give a file, a glob, a folder or shards")
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    suffixes = tuple(suffixes or KNOWN_SUFFIXES)
    files: list[str] = []
    for item in items:
        for pattern in braceexpand(str(item)):
            pattern = os.path.expanduser(pattern)
            if os.path.isdir(pattern) and not is_hf_dataset_dir(pattern):
                found = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and _has_suffix(p.name, suffixes))
                if not found:
                    raise DataError(f"{what}: folder '{pattern}' holds no file ending in {', '.join(suffixes)}")
                files += found
            elif any(ch in pattern for ch in "*?["):
                found = sorted(glob.glob(pattern, recursive=True))
                if not found:
                    raise DataError(f"{what}: no file matches '{pattern}'")
                files += found
            elif os.path.exists(pattern):
                files.append(pattern)
            else:
                raise DataError(f"{what}: no file matches '{pattern}'")
    _refuse_repeated(files, what)
    return files


def _refuse_repeated(files: list[str], what: str) -> None:
    """One file named twice (``a.jsonl`` and ``*.jsonl``, a folder and a file in it) would be read twice,
    silently doubling its weight: an error, with the way to weight a source on purpose."""
    seen: dict[str, str] = {}
    for file in files:
        real = os.path.realpath(file)
        if real in seen:
            raise DataError(f"{what}: '{file}' is named twice (also as '{seen[real]}'), so it would be read twice",
                            source=file, hint="name each file once; to weight a source use a mixture, "
                                              "[{path: a.jsonl, weight: 2}, {path: b.jsonl}]")
        seen[real] = file
