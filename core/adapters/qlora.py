"""QLoRA: a 4-bit NF4 base (bitsandbytes) with LoRA adapters on top.

Loading a hub model quantised is the job of ``from_pretrained(...,
quantization_config=bnb_quantization_config())`` (the GPU path). For a model
already built in memory, which is how every plugin's default builds models,
``quantize_linears`` swaps each ``nn.Linear`` for a ``bitsandbytes`` ``Linear4bit``
holding the same weights; moving it to a device quantises it (bitsandbytes
quantises on ``.to(device)``, CPU included). Written by hand because neither
PEFT nor bitsandbytes quantises an existing arbitrary ``nn.Module``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalforge.adapters.peft_adapters import LoraAdapter


def bnb_quantization_config(compute_dtype: str = "bfloat16", quant_type: str = "nf4", double_quant: bool = True):  # noqa: ANN201
    """``transformers.BitsAndBytesConfig`` for loading a hub model in 4 bits."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def quantize_linears(module: nn.Module, *, skip: list[str] = (), compute_dtype: torch.dtype = torch.float32,
                     quant_type: str = "nf4", double_quant: bool = True) -> int:
    """Replace ``nn.Linear`` layers (except names matching ``skip``) with quantised 4-bit layers; returns the count."""
    import bitsandbytes as bnb

    replaced = 0
    for name, child in list(module.named_modules()):
        for child_name, layer in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(layer, nn.Linear) or any(fnmatch.fnmatchcase(full, p) or full.endswith(p) for p in skip):
                continue
            device = layer.weight.device
            q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                                  device="meta")
            q.weight = bnb.nn.Params4bit(layer.weight.data.to("cpu"), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant)
            if layer.bias is not None:
                q.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
            setattr(child, child_name, q.to(device))
            replaced += 1
    return replaced


class QLoraAdapter(LoraAdapter):
    """LoRA over a 4-bit NF4 base.

    Args:
        compute_dtype: dtype of the dequantised matmuls (``float32`` on CPU, ``bfloat16`` on GPUs).
        quant_type: ``nf4`` or ``fp4``. double_quant: quantise the quantisation constants too.
        skip_modules: linear layers kept in full precision (the output head by default).
        Other arguments as ``LoraAdapter``.
    """

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | str | None = None,
                 modules_to_save: list[str] | None = None, compute_dtype: str = "float32", quant_type: str = "nf4",
                 double_quant: bool = True, skip_modules: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                         modules_to_save=modules_to_save, **kwargs)
        self.compute_dtype, self.quant_type, self.double_quant = compute_dtype, quant_type, double_quant
        self.skip_modules = list(skip_modules) if skip_modules is not None else ["lm_head"]

    def apply(self, module: nn.Module, default_targets: list[str] | str | None = None,
              heads: list[str] | None = None) -> nn.Module:
        already = any(type(m).__name__ == "Linear4bit" for m in module.modules())
        if not already:
            if quantize_linears(module, skip=self.skip_modules + list(self._heads(heads) or []), compute_dtype=getattr(torch, self.compute_dtype),
                                quant_type=self.quant_type, double_quant=self.double_quant) == 0:
                raise ValueError("adapter=qlora: the model has no nn.Linear layer to quantise")
        module.requires_grad_(False)
        return super().apply(module, default_targets, heads)

    def save(self, module: nn.Module, directory: str | Path) -> None:
        module.save_pretrained(str(directory))
