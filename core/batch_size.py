"""``data.batch_size=auto``: the config side and the search itself (no Lightning in here).

A batch size that does not fit ends a run in an out-of-memory error; one far below what
fits wastes the device. ``data.batch_size=auto`` tries batches on the real model, optimizer
and data before training starts (:class:`modalforge.callbacks.batch_size_search.BatchSizeSearch`)
and trains with the largest that fits. This module holds what does not need a trainer:

- the options: ``data.batch_size=auto``, ``+data.max_batch_size=N`` (the cap; the training set's
  size caps it too) and ``+data.batch_size_search=power|binsearch``. They are the core's, not a
  DataModule's, so :func:`datamodule_config` drops them (and stands in ``1`` for ``auto``) before
  the plugin's DataModule is built: every DataModule keeps its ``batch_size: int``;
- :func:`search`: doubling from 2 until a batch runs out of memory or reaches the cap
  (``power``), then, for ``binsearch``, bisecting between the last fit and the first failure;
- :func:`recorded_batch_size`: the value a checkpoint's run found, which a resume reuses
  (the same batches and steps per epoch as the run it continues; no second search).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from modalforge.errors import ConfigError

AUTO = "auto"
MODES = ("power", "binsearch")
#: Data keys the core reads and a DataModule never sees.
SEARCH_KEYS = ("max_batch_size", "batch_size_search")
#: The cap when neither data.max_batch_size nor the data set's size gives one (Lightning's finder's too).
DEFAULT_MAX = 8192
#: Where a checkpoint keeps the found value (the callback's state key).
STATE_KEY = "BatchSizeSearch"


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


def check_options(data: Mapping[str, Any]) -> None:
    """Raise ``ConfigError`` for a wrong ``data.batch_size``/``max_batch_size``/``batch_size_search``."""
    batch_size = data.get("batch_size")
    if isinstance(batch_size, str) and not is_auto(batch_size) and not batch_size.startswith("${"):
        raise ConfigError(f"{batch_size!r} is not an integer or auto", where="data.batch_size",
                          hint="give examples per batch (data.batch_size=16), or data.batch_size=auto for the "
                               "largest batch that fits in memory")
    cap, mode = data.get("max_batch_size"), data.get("batch_size_search")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise ConfigError(f"{cap!r} is not a positive integer", where="data.max_batch_size")
    if mode is not None and mode not in MODES:
        raise ConfigError(f"{mode!r} is not one of: {', '.join(MODES)}", where="data.batch_size_search")
    if (cap is not None or mode is not None) and not is_auto(batch_size):
        key = "data.max_batch_size" if cap is not None else "data.batch_size_search"
        raise ConfigError(f"is only used with data.batch_size=auto (data.batch_size={batch_size})", where=key,
                          hint=f"set data.batch_size=auto, or drop {key}")


def datamodule_config(data: Mapping[str, Any], batch_size: int = 1) -> dict[str, Any]:
    """The data node as the DataModule takes it: no search keys, ``auto`` replaced by ``batch_size``."""
    out = {k: v for k, v in data.items() if k not in SEARCH_KEYS}
    if is_auto(out.get("batch_size")):
        out["batch_size"] = batch_size
    return out


def recorded_batch_size(checkpoint: Mapping[str, Any]) -> int | None:
    """The batch size the checkpoint's run found (or was given), for a resume with ``auto``."""
    state = (checkpoint.get("callbacks") or {}).get(STATE_KEY) or {}
    if isinstance(state.get("batch_size"), int):
        return int(state["batch_size"])
    from modalforge.checkpoints import CONFIG_KEY

    given = ((checkpoint.get(CONFIG_KEY) or {}).get("data") or {}).get("batch_size")
    return given if isinstance(given, int) and not isinstance(given, bool) else None


@dataclass
class Found:
    """What a search found: ``size`` fits; ``failed`` (if any) is the smallest size that did not."""

    size: int
    failed: int | None
    cap: int
    tried: list[tuple[int, bool]] = field(default_factory=list)
    cap_name: str = "the cap"  # what set the cap: data.max_batch_size, the training set's size

    @property
    def max_tried(self) -> int:
        return max(size for size, _ in self.tried)

    def line(self) -> str:
        """The one line a run prints: the size, the largest tried, and how to skip the search next time."""
        why = f"{self.failed} ran out of memory" if self.failed is not None else f"{self.cap_name} is {self.cap}"
        return (f"[modalforge] data.batch_size=auto: {self.size} (largest tried {self.max_tried}: {why}); "
                f"set data.batch_size={self.size} to skip the search next time")


def search(fits: Callable[[int], bool], cap: int, mode: str = "power", *, cap_name: str = "the cap") -> Found:
    """The largest batch size in ``[1, cap]`` for which ``fits`` holds (``0`` when not even 1 does).

    ``power`` doubles from 2 (1 when 2 does not fit), trying ``cap`` itself last, and keeps the last
    size that fit; ``binsearch`` goes on to bisect between it and the first that did not.
    """
    tried: list[tuple[int, bool]] = []

    def trial(size: int) -> bool:
        ok = fits(size)
        tried.append((size, ok))
        return ok

    size, good, bad = min(2, cap), 0, None
    while True:
        if not trial(size):
            bad = size
            break
        good = size
        if size >= cap:
            break
        size = min(size * 2, cap)
    if good == 0 and bad is not None and bad > 1:
        good, bad = (1, bad) if trial(1) else (0, 1)
    if mode == "binsearch" and bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if trial(mid):
                good = mid
            else:
                bad = mid
    return Found(size=good, failed=bad, cap=cap, tried=tried, cap_name=cap_name)
