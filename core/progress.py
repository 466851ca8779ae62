"""Progress of the long steps before training (warm starts, tokenisation, caches, header passes).

A first run that sits silent for a minute looks hung. Each such step runs inside
:func:`preparing`: one log line when it starts (what, how much, where its result
is cached), a tqdm bar on stderr while it runs, and one log line with its
duration when it ends. The lines go through ``logging`` at INFO (a run's console
and log file); the bar only where it can be seen: rank zero, and stderr a
terminal unless ``MODALFORGE_PROGRESS=1`` forces it (``0`` hides it). Other
ranks draw no bar (they do the same work) but log their lines, which the logging
setup keeps on their own console: a slow node shows where it spends its time.

    with preparing("sft data.train: tokenising", total=len(items), unit="conversation") as step:
        for item in step.track(items):
            ...
        step.summary = "200 examples -> 40 packed rows"
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
#: ``1`` forces the bar (a log file, CI), ``0`` hides it; unset: shown when stderr is a terminal.
ENV = "MODALFORGE_PROGRESS"


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank (process group, or the launchers' environment)."""
    from modalforge.scale.ranks import rank_world

    rank, world = rank_world()
    if world > 1:
        return rank == 0
    # Before the process group is up (a warm start inside model building), the launcher's variables say it.
    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _bar_disable() -> bool | None:
    """tqdm's ``disable``: ``None`` hides the bar when stderr is not a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "always"):
        return False
    if forced in ("0", "false", "no", "never"):
        return True
    return None


class Preparation:
    """A running step: advance it with :meth:`update` or :meth:`track`; ``summary`` ends its last line."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self.done = 0
        self.summary: str | None = None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def track(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, one :meth:`update` per item taken."""
        for item in items:
            yield item
            self.update()

    def show(self, **values: Any) -> None:
        """Figures beside the bar (a loss); nothing is logged."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)


@contextmanager
def preparing(what: str, total: int | None = None, unit: str = "item", *,
              cached_in: str | Path | None = None) -> Iterator[Preparation]:
    """Run one preparation step with a start line, a bar and an end line with its duration.

    Args:
        what: the step, as the lines name it ("vlm: pretraining the vision tower").
        total: how many ``unit``s it takes, if known (the bar then shows a rate and time left).
        unit: what one ``update`` counts (singular).
        cached_in: where the result is kept, so the start line can say the step runs once.
    """
    size = f"{total} {unit}{'' if total == 1 else 's'}" if total is not None else "started"
    once = f" (this runs once; cached under {cached_in})" if cached_in is not None else ""
    log.info("%s: %s%s", what, size, once)
    bar = None
    if is_rank_zero():
        from tqdm import tqdm

        # On a terminal the end line replaces the bar; a forced bar elsewhere (a log file) keeps its last state.
        bar = tqdm(total=total, desc=what, unit=unit, file=sys.stderr, disable=_bar_disable(), dynamic_ncols=True,
                   leave=not _is_terminal(sys.stderr))
    step = Preparation(bar)
    start = time.perf_counter()
    try:
        yield step
    except BaseException:
        if bar is not None:
            bar.close()
        log.info("%s: stopped after %s", what, _seconds(time.perf_counter() - start))
        raise
    if bar is not None:
        bar.close()
    log.info("%s: done in %s%s", what, _seconds(time.perf_counter() - start),
             f" ({step.summary})" if step.summary else "")


def _seconds(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"
