"""Small helpers shared by adapters and the LightningModule."""

from __future__ import annotations

from torch import nn


def trainable_parameter_summary(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Turn on activation checkpointing of a Hugging Face model, PEFT-wrapped or not.

    With frozen embeddings (LoRA), checkpointed blocks would receive inputs without
    ``requires_grad`` and produce no gradient; ``enable_input_require_grads`` fixes that.
    """
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"module.gradient_checkpointing=true: {type(base).__name__} has no "
                         "gradient_checkpointing_enable(); use strategy=fsdp strategy.activation_checkpointing=true")
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()
