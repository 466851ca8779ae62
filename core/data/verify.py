"""A header pass over a data set's images or audio before training starts.

A corrupt file met at step 40,000 costs a restart; the same file found by a
header check (PIL ``verify``, libsndfile ``info``) costs milliseconds. The pass
runs when ``data.verify`` is true, or, by default (``null``), when the set is
small enough to be cheap (``AUTO_LIMIT`` files); it shows a bar and its duration. A bad file
stops the run naming it (and saying "not found" for a missing one), or, with
``data.skip_bad=true``, is skipped, counted and reported.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

from modalforge.data.errors import DataError
from modalforge.progress import preparing

log = logging.getLogger(__name__)
T = TypeVar("T")
#: ``data.verify=null`` checks sets of up to this many media files.
AUTO_LIMIT = 50_000


def verify_media(items: Sequence[T], problem_of: Callable[[T], str | None], describe: Callable[[T], str], *,
                 what: str, verify: bool | None = None, skip_bad: bool = False, kind: str = "file") -> list[T]:
    """``items`` whose media pass the header check; raises ``DataError`` on the first bad one unless ``skip_bad``."""
    if verify is False or (verify is None and len(items) > AUTO_LIMIT and not skip_bad):
        if verify is None:
            log.info("%s: %d %ss, more than %d: header check skipped (data.verify=true forces it)", what, len(items),
                     kind, AUTO_LIMIT)
        return list(items)
    good: list[T] = []
    bad: list[tuple[str, str]] = []
    with preparing(f"{what}: checking {kind} headers", total=len(items), unit=kind) as step:
        for item in step.track(items):
            problem = problem_of(item)
            if problem is None:
                good.append(item)
                continue
            if not skip_bad:
                raise DataError(problem, source=describe(item),
                                hint="fix or remove it, or skip unreadable files with data.skip_bad=true")
            bad.append((describe(item), problem))
        step.summary = "data.verify=false skips this"
    if bad:
        log.warning("%s: skipped %d unreadable %s(s) of %d (data.skip_bad=true), first: %s (%s)", what, len(bad),
                    kind, len(items), bad[0][0], bad[0][1])
    if not good:
        raise DataError(f"{what}: every {kind} is unreadable (first: {bad[0][0]}: {bad[0][1]})")
    return good


