"""Small helpers shared by adapters and the LightningModule."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from modalforge.errors import ConfigError


def trainable_parameter_summary(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def enable_gradient_checkpointing(module: nn.Module) -> str:
    """Turn on activation checkpointing of ``module`` (PEFT-wrapped or not) with its library's own switch.

    Trades compute for activation memory: blocks keep only their inputs and recompute the rest in the
    backward pass. Tried in order, on the module and then on its submodules (a wrapper holding a UNet):
    transformers (``gradient_checkpointing_enable``; with frozen embeddings under LoRA,
    ``enable_input_require_grads`` gives checkpointed blocks inputs that need gradients), diffusers
    (``enable_gradient_checkpointing``), open_clip and timm (``set_grad_checkpointing``); any other
    model (torchvision's) gets ``torch.utils.checkpoint`` per block, a block being a child of an
    ``nn.Sequential`` whose children are all blocks of a model library rather than bare ``torch.nn``
    layers (ResNet's ``layer1..layer4``, a ViT's ``encoder.layers``). Returns what was used, for the log.

    Raises:
        ConfigError: the model has no blocks to checkpoint (say, a stack of bare layers).
    """
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    used: list[str] = []
    _enable(base, used)
    if not used:
        raise ConfigError(f"{type(base).__name__} has no switch for it (transformers, diffusers, open_clip, timm) and no "
                          "blocks to checkpoint: no nn.Sequential of library blocks (a ResNet stage, a ViT encoder)",
                          where="module.gradient_checkpointing",
                          hint="set module.gradient_checkpointing=false, or build the model with its layers grouped "
                               "in an nn.Sequential of blocks")
    return ", ".join(sorted(set(used)))


def _enable(module: nn.Module, used: list[str]) -> None:
    if _library_switch(module, used):
        return
    if isinstance(module, nn.Sequential) and _is_block_sequence(module):
        for block in module:
            _checkpoint_block(block)
        used.append("torch.utils.checkpoint per block")
        return
    for child in module.children():
        _enable(child, used)


def _library_switch(module: nn.Module, used: list[str]) -> bool:
    """Enable the model library's own checkpointing on ``module`` if it has one."""
    kind = type(module).__module__.split(".")[0]
    transformers, diffusers = sys.modules.get("transformers"), sys.modules.get("diffusers")  # loaded if in use
    if transformers is not None and isinstance(module, transformers.PreTrainedModel):
        if not module.supports_gradient_checkpointing:
            return False
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(module, "enable_input_require_grads"):
            module.enable_input_require_grads()
        used.append("transformers gradient_checkpointing_enable")
        return True
    if diffusers is not None and isinstance(module, diffusers.ModelMixin):
        if not getattr(module, "_supports_gradient_checkpointing", False):
            return False
        module.enable_gradient_checkpointing()
        used.append("diffusers enable_gradient_checkpointing")
        return True
    if kind in ("open_clip", "timm") and hasattr(module, "set_grad_checkpointing"):
        if any(getattr(m, "running_mean", None) is not None for m in module.modules()):
            # Their checkpoint_seq recomputes BatchNorm in train mode, which moves its running statistics
            # twice per step; checkpointing per block here keeps them as without checkpointing.
            found: list[str] = []
            for child in module.children():
                _enable(child, found)
            if found:
                used.extend(found)
                return True
        try:
            module.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError):  # some towers (open_clip's ModifiedResNet) have none
            return False
        used.append(f"{kind} set_grad_checkpointing")
        return True
    return False


def _is_block(module: nn.Module) -> bool:
    return not type(module).__module__.startswith("torch.") and any(True for _ in module.parameters())


def _is_block_sequence(seq: nn.Sequential) -> bool:
    children = list(seq.children())
    return bool(children) and all(_is_block(c) for c in children)


_CHECKPOINTED: dict[type, type] = {}


def _checkpoint_block(block: nn.Module) -> None:
    """Give ``block`` a checkpointed forward by swapping its class for a subclass: parameter names,
    ``isinstance`` checks (FSDP block classes) and ``deepcopy`` (EMA copies) stay as they were."""
    cls = type(block)
    if getattr(cls, "_modalforge_checkpointed", False):
        return
    if cls not in _CHECKPOINTED:
        _CHECKPOINTED[cls] = type(cls.__name__, (cls,), {"forward": _checkpointed_forward,
                                                         "_modalforge_checkpointed": True,
                                                         "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    block.__class__ = _CHECKPOINTED[cls]


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = super(type(self), self).forward
    if not (self.training and torch.is_grad_enabled()):
        return inner(*args, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, context_fn=partial(_norm_stats_kept, self), **kwargs)


def _norm_stats_kept(block: nn.Module) -> tuple[Any, Any]:
    """Checkpoint contexts: the recomputation in backward must not update BatchNorm's running statistics
    a second time (they would move twice per step and differ from a run without checkpointing)."""
    return nullcontext(), _RestoreNormStats(block)


class _RestoreNormStats:
    def __init__(self, block: nn.Module) -> None:
        self.norms = [m for m in block.modules() if getattr(m, "running_mean", None) is not None]

    def __enter__(self) -> None:
        self.saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None} for m in self.norms]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for norm, saved in zip(self.norms, self.saved):
                for key, value in saved.items():
                    getattr(norm, key).copy_(value)
