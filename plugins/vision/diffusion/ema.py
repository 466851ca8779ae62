"""EMA of the trained weights: diffusers' ``EMAModel`` does the update, buffers hold its state.

``EMAModel`` is not an ``nn.Module``, so Lightning would neither save nor move its shadow
weights. Registering the very same tensors as buffers of a small module puts them in the
Objective's ``state_dict``: they are checkpointed, resumed and moved to the device with the
model, and stay out of the optimizer (buffers are not parameters).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


class EMAWeights(nn.Module):
    """Shadow copies of ``params`` updated after each optimizer step.

    Args:
        params: the trained parameters (the denoiser's, or only its LoRA weights under an adapter).
        decay: the EMA decay (``objective.ema.decay``); diffusers warms it up as ``(1 + n) / (10 + n)``.
        update_after_step: optimizer steps before the EMA starts following.
    """

    def __init__(self, params: Iterable[nn.Parameter], decay: float, update_after_step: int = 0) -> None:
        super().__init__()
        from diffusers.training_utils import EMAModel

        params = list(params)
        self.ema = EMAModel(params, decay=decay, update_after_step=update_after_step, foreach=True)
        self.count = len(self.ema.shadow_params)
        for i, shadow in enumerate(self.ema.shadow_params):
            self.register_buffer(f"shadow_{i}", shadow)
        self.register_buffer("optimization_step", torch.zeros((), dtype=torch.long))

    def _sync(self) -> None:
        # Moving the module to a device replaces buffer tensors; point EMAModel at the current ones.
        self.ema.shadow_params = [getattr(self, f"shadow_{i}") for i in range(self.count)]
        self.ema.optimization_step = int(self.optimization_step)

    def _match_sharding(self, params: list[nn.Parameter]) -> None:
        # Under strategy=fsdp the trained parameters are DTensor shards: the shadows become shards
        # the same way (a collective, on every rank), so the update runs shard by shard and the
        # EMA costs 1/world of its memory; a full-state checkpoint gathers them like the weights.
        from torch.distributed.tensor import DTensor, distribute_tensor

        for i, (shadow, param) in enumerate(zip([getattr(self, f"shadow_{i}") for i in range(self.count)], params)):
            if isinstance(param, DTensor) and not isinstance(shadow, DTensor):
                setattr(self, f"shadow_{i}", distribute_tensor(shadow.to(param.device), param.device_mesh,
                                                               param.placements))

    @torch.no_grad()
    def step(self, params: Iterable[nn.Parameter]) -> None:
        params = list(params)
        self._match_sharding(params)
        self._sync()
        self.ema.step(params)
        self.optimization_step.fill_(self.ema.optimization_step)

    @contextmanager
    def applied(self, params: Iterable[nn.Parameter]) -> Iterator[None]:
        """Inside the block ``params`` hold the EMA weights; the trained ones come back after."""
        params = list(params)
        self._match_sharding(params)
        self._sync()
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            # strategy=fsdp: diffusers' foreach copies have no DTensor rule; shard by shard instead
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for param, shadow in zip(params, self.ema.shadow_params):
                    param.copy_(shadow)
            try:
                yield
            finally:
                with torch.no_grad():
                    for param, old in zip(params, saved):
                        param.copy_(old)
            return
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)
