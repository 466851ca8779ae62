"""Tiny models saved like downloaded checkpoints, and built rollout objectives, for the tests that need them."""

from __future__ import annotations

from typing import Any

import torch


def save_tiny_llama(folder: Any, layers: int = 2) -> None:
    """A tiny Llama + the causal_lm demo tokenizer, saved like a downloaded checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modalforge.plugins.text.causal_lm.data import CausalLMDataModule

    dm = CausalLMDataModule(block_size=32, batch_size=4)
    dm.setup()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(dm.processor), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    dm.processor.save_pretrained(folder)


def built_objective(overrides: list[str]) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the configured Objective, its first training batch) of ``train <overrides>``, without a Trainer."""
    from modalforge.config import compose
    from modalforge.run import build_components, build_module

    cfg = compose(list(overrides))
    dm, objective, adapter = build_components(cfg)
    module = build_module(cfg, objective, adapter)
    dm.setup()
    objective.connect(dm)
    module.configure_model()
    return objective, next(iter(dm.train_dataloader()))
