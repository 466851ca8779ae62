"""The optimizer step is the unit: a token loss is a mean over the whole step's tokens.

An Objective returns the mean of its loss over the items of one micro-batch
(``StepOutput.mean_over``: learned tokens, pairs). Averaging those means per
micro-batch (Lightning's accumulation) and per rank (DDP, FSDP) weighs a
micro-batch of 3 learned tokens like one of 90, so batch size, accumulation
and device count would change the gradient: the accumulation bug transformers
fixed in October 2024. Here each micro-batch's loss is turned back into its sum
before ``backward``, and once the step's gradients are accumulated and reduced,
they are scaled by ``world_size * accumulate_grad_batches / total_items``, with
``total_items`` summed over the step's micro-batches and all ranks (one small
all-reduce per step). The gradient is then that of the mean over every item of
the step, however the step was split. The logged loss is the same mean.

Written by hand: Lightning offers no hook for a loss normalised over a step.
Objectives that return a per-batch value (``mean_over=None``) keep Lightning's
averaging, and their logged loss is the mean over micro-batches and ranks.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


class StepLoss:
    """Accumulates one optimizer step's loss sums; rescales gradients when the step ends."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None  # sum of item losses (or of micro-batch means)
        self._count: torch.Tensor | None = None  # items (or micro-batches)
        self.per_item = False
        self.last: torch.Tensor | None = None  # the previous step's loss, for logging

    def micro_batch(self, loss: torch.Tensor, mean_over: int | torch.Tensor | None, *, rescale: bool) -> torch.Tensor:
        """The loss to ``backward`` for one micro-batch (its sum over items when ``mean_over`` is given)."""
        detached = loss.detach().float()
        if mean_over is None:
            weight = torch.ones((), device=loss.device)
            out = loss
        else:
            weight = torch.as_tensor(mean_over, device=loss.device, dtype=torch.float32)
            # A micro-batch with no item contributes nothing (its mean would be NaN).
            detached = torch.where(weight > 0, detached * weight, torch.zeros_like(detached))
            # An empty micro-batch's mean is NaN, but its gradient is zero: it adds nothing.
            out = loss * weight if rescale else loss
            self.per_item = self.per_item or rescale
        self._sum = detached if self._sum is None else self._sum + detached
        self._count = weight if self._count is None else self._count + weight
        return out

    def finish(self, parameters: Iterable[nn.Parameter], *, world_size: int, accumulate: int,
               all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor | None:
        """End the step: scale accumulated gradients (per-item losses) and return the step's mean loss."""
        if self._sum is None:
            return None
        totals = torch.stack([self._sum, self._count.to(self._sum.dtype)])
        if all_reduce is not None and world_size > 1:
            totals = all_reduce(totals)
        loss_sum, count = totals[0], totals[1]
        if self.per_item:
            # DDP/FSDP averaged the gradients over ranks and Lightning divided by the accumulation
            # count: undo both and divide by the items of the whole step instead.
            factor = torch.where(count > 0, world_size * accumulate / count.clamp_min(1e-12), torch.zeros_like(count))
            grads = [p.grad for p in parameters if p.grad is not None]
            if grads:
                _scale(grads, factor)
        self.last = loss_sum / count.clamp_min(1e-12)
        self._sum = self._count = None
        self.per_item = False
        return self.last


def _scale(grads: list[torch.Tensor], factor: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()  # type: ignore[assignment]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if plain:
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in plain:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for (device, dtype), group in groups.items():
            torch._foreach_mul_(group, factor.to(device=device, dtype=dtype))
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if sharded:
        scalar = float(factor)  # a DTensor is scaled by a Python number, not a plain tensor
        for g in sharded:
            g.mul_(scalar)
