"""How many dataloader worker processes: ``data.num_workers=auto`` follows the machine.

Workers overlap reading with the training step. They pay when an item costs real work (an
image or an audio file decoded and transformed per item) and there are cores to spare for them;
for token ids already in memory, shipping each batch from a worker process costs more than the
collate it moves, so the main process does it (measured with ``benchmarks/loader_throughput.py``).
A process gets its share of the machine's cores (one process per device under DDP), keeps one
for itself, and at most 8 workers.
"""

from __future__ import annotations

import os
from typing import Literal, Union

from modalforge.errors import ConfigError

Workers = Union[int, Literal["auto"]]
MAX_AUTO_WORKERS = 8
#: Below this many cores per process, worker processes compete with the step's own threads.
MIN_CORES_FOR_WORKERS = 4


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(value: Workers, *, decodes_per_item: bool, processes: int = 1) -> tuple[int, str]:
    """The number of workers for ``value``, and why (one line, printed once at start)."""
    if value != "auto":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"data.num_workers must be a number >= 0 or auto, not {value!r}",
                              where="data.num_workers")
        return value, f"data.num_workers={value}"
    cores = max(1, usable_cores() // max(1, processes))
    per = f"{cores} core{'s' * (cores > 1)}" + (f" per process ({processes} processes)" if processes > 1 else "")
    if not decodes_per_item:
        return 0, f"data.num_workers=auto: 0 (items are in memory; {per})"
    if cores < MIN_CORES_FOR_WORKERS:
        return 0, f"data.num_workers=auto: 0 ({per}: workers would take the training step's cores)"
    workers = min(MAX_AUTO_WORKERS, cores - 1)
    return workers, f"data.num_workers=auto: {workers} (files decoded per item; {per})"
