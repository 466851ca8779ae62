"""Tokenised datasets kept on disk: a second start of the same run skips tokenisation.

A text DataModule's ``build`` (chat template, masks, truncation, packing) is the slow part
of a start: tens of seconds for tens of thousands of conversations, redone at every start
although nothing changed. :func:`cached` runs it once per *key* and keeps its result as
memory-mapped numpy arrays (``.npy``, ragged lists as one flat array + offsets) with a JSON
``meta.json``; later starts map the arrays and skip the work.

The key (a sha256) covers:

- **the data, by content**: a digest of the parsed items ``build`` receives (messages, tools,
  per-message train flags, where each was read), not the files' path/size/mtime. Reading and
  parsing run at every start anyway (samples and evaluation use the items), cost a small
  share of tokenising, and the digest then also covers what mtime cannot: a file rewritten
  within the clock's resolution, a copy with its mtime preserved, ``hf:`` datasets, a
  mixture's per-source mapping, the held-out split, and every option that changes the items
  (``data.columns`` / ``roles`` / ``format`` / ``oasst_paths`` / ``system_prompt=fold``);
- **the tokenizer**: its serialised vocabulary, merges, normalisation and post-processing
  (``backend_tokenizer.to_str()``, else the vocabulary), special and added tokens and its chat
  template(s);
- **the options** that change tokens, passed by the DataModule (``max_length``, ``too_long``,
  ``train_on``, ``packing``, the template choice...);
- **the code**: the source files of the modules that tokenise (a fix in them re-tokenises).

Where: ``data.token_cache=auto`` (default) is ``<data.cache_dir or $MODALFORGE_CACHE or
~/.cache/modalforge>/tokenized``; ``off`` tokenises every time; any other value is a folder.
Each entry is written into a temporary folder renamed into place under a file lock
(:func:`modalforge.data.cache.ensure_built`), so an interrupted start never leaves a half
entry that a later one reads. Entries are never evicted: delete the folder to free space.

Under DDP/FSDP (``torch.distributed`` initialised), local rank zero of each node tokenises and
writes while the other ranks wait at a barrier, then read. The wait is bounded by the process
group's timeout (30 minutes by default): for a very large set, fill the cache first with
``modalforge preprocess <train overrides>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError

log = logging.getLogger(__name__)

#: Bumped when the layout of an entry changes.
FORMAT = 1
Arrays = dict[str, np.ndarray]
Built = tuple[Arrays, dict[str, Any]]


def cache_folder(option: str | bool | None, cache_dir: str | Path | None = None) -> Path | None:
    """The folder of ``data.token_cache``: ``auto`` (``<cache root>/tokenized``), ``off`` (``None``), or a folder."""
    if option is False or (isinstance(option, str) and option.lower() in ("off", "false", "none", "no")):
        return None
    if option is None or option is True or (isinstance(option, str) and option.lower() in ("auto", "on", "true")):
        return cache_root(cache_dir or os.environ.get("MODALFORGE_CACHE")) / "tokenized"
    if not isinstance(option, (str, Path)):
        raise DataError(f"data.token_cache={option!r} is not one of: auto, off, or a folder")
    return Path(option).expanduser()


def digest(*parts: Any) -> str:
    """A sha256 of JSON-able parts (sorted keys; anything else by ``str``)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str, ensure_ascii=False).encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()


def items_digest(items: Iterable[Any], encode: Callable[[Any], Any] = lambda item: item) -> str:
    """A sha256 of every item (``encode(item)`` as JSON), in order."""
    h = hashlib.sha256()
    dumps = json.JSONEncoder(sort_keys=True, default=str, ensure_ascii=False).encode
    for item in items:
        h.update(dumps(encode(item)).encode("utf-8", "replace"))
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """What makes a tokenizer's tokens: its serialised model, special and added tokens, chat template(s)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    added = {str(i): str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    return digest(type(tokenizer).__name__, hashlib.sha256(body.encode("utf-8", "replace")).hexdigest(),
                  getattr(tokenizer, "chat_template", None), getattr(tokenizer, "special_tokens_map", None), added,
                  getattr(tokenizer, "padding_side", None), getattr(tokenizer, "add_bos_token", None),
                  getattr(tokenizer, "add_eos_token", None))


def code_digest(*modules: str) -> str:
    """A sha256 of the source files of the named modules (those loaded), so a change in them re-tokenises."""
    h = hashlib.sha256()
    for name in modules:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path and os.path.exists(path):
            h.update(Path(path).read_bytes())
        h.update(name.encode())
    return h.hexdigest()


# ---- ragged lists ------------------------------------------------------------------------
def ragged(lists: Sequence[Sequence[int]], dtype: Any = np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ints as one flat array and ``len + 1`` offsets."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    flat = np.fromiter((v for x in lists for v in x), dtype=np.int64, count=int(offsets[-1]))
    if dtype == np.int32 and flat.size and (flat.max() > np.iinfo(np.int32).max or flat.min() < np.iinfo(np.int32).min):
        dtype = np.int64
    return flat.astype(dtype), offsets


class Ragged(Sequence):
    """A read-only list of int lists over a flat array and its offsets (memory-mapped from a cache entry)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> list[int]:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.flat[self.offsets[index]: self.offsets[index + 1]].tolist()

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ---- the cache ---------------------------------------------------------------------------
def _write(folder: Path, built: Built) -> None:
    arrays, meta = built
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
    (folder / "meta.json").write_text(json.dumps({"format": FORMAT, "arrays": sorted(arrays), **meta}))


def _read(folder: Path) -> Built:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in meta["arrays"]}
    return arrays, meta


def _distributed() -> tuple[bool, Any] | None:
    """``(local rank zero?, torch.distributed)`` in a multi-process group, else ``None``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local = os.environ.get("LOCAL_RANK")
    return (int(local) == 0 if local is not None else dist.get_rank() == 0), dist


def _get(path: Path, build: Callable[[], Built], retry: bool = True) -> tuple[Built, bool]:
    """The entry at ``path`` (``hit`` True), or built, written atomically and read back.

    An entry that cannot be read (files removed by hand, a folder that is no entry) is removed and built again."""
    if path.exists():
        try:
            return _read(path), True
        except (OSError, ValueError, KeyError) as err:
            if not retry:
                raise
            log.warning("token cache: %s cannot be read (%s); tokenising again", path, err)
            shutil.rmtree(path, ignore_errors=True)
    built: list[Built] = []

    def write(tmp: Path) -> None:
        built.append(build())
        _write(tmp, built[0])

    try:
        ensure_built(path, write)
    except OSError as err:  # a read-only or full disk: the run goes on, tokenised in memory
        if built:
            log.warning("token cache: could not write %s (%s); tokenised in memory this time", path, err)
            return built[0], False
        raise
    if built:
        return _read(path), False
    return _get(path, build, retry=False)  # another process wrote it while this one waited for the lock


def entry_path(folder: Path, name: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return folder / f"{safe}-{key[:24]}"


def cached(name: str, folder: Path | None, key_parts: dict[str, Any],
           build: Callable[[], Built]) -> tuple[Built, bool, Path | None]:
    """``build()``'s ``(arrays, meta)``, kept under ``folder`` by ``key_parts``; ``(result, from cache?, entry)``.

    ``folder=None`` (``data.token_cache=off``) builds every time. Under ``torch.distributed``, local
    rank zero builds and writes while the others wait at a barrier and then read; every rank takes
    the same path (the barrier depends only on the config), so none waits alone. If rank zero failed,
    the others find no entry and build themselves (raising the same error)."""
    if folder is None:
        return build(), False, None
    path = entry_path(folder, name, digest({"format": FORMAT, **key_parts}))
    group = _distributed()
    if group is None:
        result, hit = _get(path, build)
    elif group[0]:
        try:
            result, hit = _get(path, build)
        finally:
            group[1].barrier()
    else:
        group[1].barrier()
        result, hit = _get(path, build)
    return result, hit, path


def describe(path: Path | None, hit: bool, what: str, count: int) -> str:
    if path is None:
        return f"{what}: {count} examples tokenised (data.token_cache=off)"
    return f"{what}: {count} examples {'read from' if hit else 'tokenised into'} the token cache {path}"
