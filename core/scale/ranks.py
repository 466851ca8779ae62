"""This process's rank and the world size once ``torch.distributed`` is up; (0, 1) before or without it."""

from __future__ import annotations


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1): one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close_process_group() -> None:
    """End a finished run's process group while the interpreter is whole.

    Left to interpreter exit, gloo's worker threads can still hold work whose tensors are
    freed during finalisation: the process then aborts ("terminate called without an active
    exception", exit -6) after a run that succeeded (pytorch/pytorch#179291). The barrier
    keeps rank zero, which hosts the rendezvous store, until every rank is done with it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
