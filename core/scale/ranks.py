"""This process's rank and the world size once ``torch.distributed`` is up; (0, 1) before or without it."""

from __future__ import annotations


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1): one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
