"""LoRA, DoRA and IA3 through PEFT, on Hugging Face models and on any other nn.Module.

For a ``transformers`` model ``get_peft_model`` gives the usual ``PeftModel``
(saves ``adapter_config.json`` + ``adapter_model.safetensors``, loads with
``PeftModel.from_pretrained``). Other modules (CLIP towers, UNets, plain
``nn.Sequential``) go through the same call: PEFT's custom-model support wraps
them in a ``PeftModel`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalforge.adapters.stages import continues_adapter
from modalforge.errors import ConfigError
from modalforge.interfaces import Adapter


class _PeftAdapter(Adapter):
    is_peft = True

    modules_to_save: list[str] | None = None
    #: continue training the adapter that ``model.name_or_path`` holds (see :mod:`modalforge.adapters.stages`)
    resume: bool = False

    def _config(self, targets: list[str] | str | None, heads: list[str] | None) -> Any:
        raise NotImplementedError

    def _targets(self, configured: list[str] | str | None, default: list[str] | str | None) -> list[str] | str:
        return configured or default or "all-linear"

    def _heads(self, heads: list[str] | None) -> list[str] | None:
        return self.modules_to_save if self.modules_to_save is not None else (list(heads) if heads else None)

    def load_kwargs(self, precision: str | int | None = None) -> dict[str, Any]:
        """``resume_adapter`` for builders that load an adapter folder (:mod:`modalforge.adapters.stages`)."""
        return {"resume_adapter": True} if self.resume else {}

    def apply(self, module: nn.Module, default_targets: list[str] | str | None = None,
              heads: list[str] | None = None) -> nn.Module:
        from peft import get_peft_model

        if continues_adapter(module):
            return module  # the earlier stage's adapter, loaded trainable: its own config (rank, targets) holds
        if self.resume:
            raise ConfigError("adapter.resume=true continues the adapter that model.name_or_path holds, but the "
                              "model did not come from an adapter folder (adapter_config.json)",
                              where="adapter.resume",
                              hint="point model.name_or_path at an earlier stage's final/ trained with adapter=lora "
                                   "(its builder must load adapter folders, as modalforge.text.models.build_causal_lm "
                                   "does), or drop adapter.resume to train a new adapter")
        return get_peft_model(module, self._config(default_targets, heads))

    def save(self, module: nn.Module, directory: str | Path) -> None:
        module.save_pretrained(str(directory))

    def merge(self, module: nn.Module) -> nn.Module:
        if not hasattr(module, "merge_and_unload"):
            return module
        _dequantize_4bit_bases(module)
        return module.merge_and_unload()


def _dequantize_4bit_bases(module: nn.Module) -> None:
    """Replace each LoRA layer's 4-bit base by a float ``nn.Linear`` holding its dequantised weight.

    Where PEFT wrapped a bitsandbytes ``Linear4bit`` with its plain LoRA layer (on CPU it does),
    ``merge_and_unload`` would add the float delta to the packed bytes. Merging a QLoRA adapter
    means dequantise, then add: done here, so the merged model is an ordinary float model.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for layer in list(module.modules()):
        base = getattr(layer, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit) or "bnb" in type(layer).__module__:
            continue  # PEFT's own bnb LoRA layer dequantises when it merges
        weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        dtype = base.compute_dtype or torch.float32
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=weight.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(weight.to(dtype))
            if base.bias is not None:
                plain.bias.copy_(base.bias.to(dtype))
        plain.weight.requires_grad_(False)
        layer.base_layer = plain


class LoraAdapter(_PeftAdapter):
    """Low-rank adapters (``use_dora`` for DoRA).

    Args:
        r: rank. alpha: scaling numerator (scale = alpha / r). dropout: on the adapter input.
        target_modules: module names or ``all-linear``; ``None`` uses the plugin's default.
        modules_to_save: modules trained in full and saved beside the adapter (e.g. a new head).
        bias: ``none``, ``all`` or ``lora_only``.
        resume: when ``model.name_or_path`` is an earlier stage's adapter folder, train that adapter further
            (its saved rank and targets hold) instead of merging it and training a new one.
    """

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | str | None = None,
                 modules_to_save: list[str] | None = None, bias: str = "none", use_dora: bool = False,
                 use_rslora: bool = False, resume: bool = False) -> None:
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules
        self.modules_to_save, self.bias, self.use_dora, self.use_rslora = modules_to_save, bias, use_dora, use_rslora
        self.resume = resume

    def _config(self, default_targets: list[str] | str | None, heads: list[str] | None) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self._targets(self.target_modules, default_targets),
                          modules_to_save=self._heads(heads), bias=self.bias, use_dora=self.use_dora,
                          use_rslora=self.use_rslora)


class DoraAdapter(LoraAdapter):
    """Weight-decomposed LoRA (DoRA): LoRA on the direction, a learned magnitude per output."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["use_dora"] = True
        super().__init__(**kwargs)


class IA3Adapter(_PeftAdapter):
    """IA3: learned rescaling vectors on attention and feed-forward activations.

    Args:
        target_modules: modules whose outputs are rescaled; ``None`` uses the plugin's default.
        feedforward_modules: the subset of targets that are feed-forward layers (rescaled on input).
    """

    def __init__(self, target_modules: list[str] | str | None = None,
                 feedforward_modules: list[str] | str | None = None) -> None:
        self.target_modules, self.feedforward_modules = target_modules, feedforward_modules

    def _config(self, default_targets: list[str] | str | None, heads: list[str] | None) -> Any:
        from peft import IA3Config

        targets = self._targets(self.target_modules, default_targets)
        return IA3Config(target_modules=targets, feedforward_modules=self.feedforward_modules or [],
                         modules_to_save=self._heads(heads))
