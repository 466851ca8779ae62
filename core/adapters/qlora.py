"""QLoRA: a 4-bit NF4 base (bitsandbytes) with LoRA adapters on top.

A pretrained base (``model.name_or_path``) is loaded straight in 4 bits:
:meth:`QLoraAdapter.load_kwargs` hands ``from_pretrained`` a
``transformers.BitsAndBytesConfig`` (through :func:`modalforge.adapters.pretrained_loading`,
which builders taking a ``quantization_config`` argument receive), so the
full-precision weights are never all in memory, which is QLoRA's point: a model
that fits only in 4 bits trains. For a model built in memory from a config (every
plugin's default), ``quantize_linears`` swaps each ``nn.Linear`` for a bitsandbytes
``Linear4bit`` holding the same weights; moving it to a device quantises it
(bitsandbytes quantises on ``.to(device)``, CPU included). Written by hand because
neither PEFT nor bitsandbytes quantises an existing arbitrary ``nn.Module``.

The compute dtype follows ``trainer.precision`` (bf16 for ``bf16*``, fp16 for ``16*``,
fp32 otherwise) unless ``adapter.compute_dtype`` names one.

Sharding (FSDP2, ``fully_shard``): the packed 4-bit weights shard like any parameter.
With the default ``uint8`` storage FSDP2's mixed precision leaves them alone (it casts
floating parameters only); a floating storage (``adapter.quant_storage``, what FSDP1
needs: one dtype per flat parameter) must equal the ``MixedPrecisionPolicy`` param
dtype, or the cast reinterprets packed bytes as numbers. :func:`check_fsdp_quant_storage`
checks that before sharding.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalforge.adapters.peft_adapters import LoraAdapter
from modalforge.adapters.stages import continues_adapter
from modalforge.errors import ConfigError


def compute_dtype_for(precision: str | int | None) -> str:
    """The 4-bit layers' compute dtype for a ``trainer.precision``: the dtype the matmuls run in anyway."""
    text = str(precision if precision is not None else "32")
    if text.startswith("bf16"):
        return "bfloat16"
    if text.startswith("16") or text == "half":
        return "float16"
    return "float32"


def bnb_quantization_config(compute_dtype: str = "bfloat16", quant_type: str = "nf4", double_quant: bool = True,
                            quant_storage: str = "uint8", skip_modules: list[str] | None = None):  # noqa: ANN201
    """``transformers.BitsAndBytesConfig`` for loading a saved model in 4 bits.

    Args:
        compute_dtype: dtype of the dequantised matmuls. quant_type: ``nf4`` or ``fp4``.
        double_quant: quantise the quantisation constants too.
        quant_storage: dtype the packed 4-bit weights are stored in (``bnb_4bit_quant_storage``).
        skip_modules: layers kept in full precision (``None``: transformers' choice, the output head).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                              bnb_4bit_quant_storage=getattr(torch, quant_storage),
                              llm_int8_skip_modules=list(skip_modules) if skip_modules else None)


def _skipped(name: str, pattern: str) -> bool:
    """``pattern`` matches the layer, ends its name, or names a module holding it (a head trained in full)."""
    return fnmatch.fnmatchcase(name, pattern) or name.endswith(pattern) or f".{pattern}." in f".{name}"


def quantize_linears(module: nn.Module, *, skip: list[str] = (), compute_dtype: torch.dtype = torch.float32,
                     quant_type: str = "nf4", double_quant: bool = True,
                     quant_storage: torch.dtype = torch.uint8) -> int:
    """Replace ``nn.Linear`` layers (except names matching ``skip``) with quantised 4-bit layers; returns the count."""
    import bitsandbytes as bnb

    replaced = 0
    for name, child in list(module.named_modules()):
        for child_name, layer in list(child.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(layer, nn.Linear) or any(_skipped(full, p) for p in skip):
                continue
            if isinstance(child, nn.MultiheadAttention):  # it reads out_proj.weight itself: a 4-bit one breaks it
                continue
            device = layer.weight.device
            q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                                  quant_storage=quant_storage, device="meta")
            q.weight = bnb.nn.Params4bit(layer.weight.data.to("cpu"), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=double_quant, quant_storage=quant_storage, module=q)
            if layer.bias is not None:
                q.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
            setattr(child, child_name, q.to(device))
            replaced += 1
    return replaced


def check_fsdp_quant_storage(module: nn.Module, param_dtype: torch.dtype | None) -> int:
    """Check, before ``fully_shard``, that FSDP2 can shard ``module``'s 4-bit weights; returns how many there are.

    For the FSDP2 strategy: call it with the ``MixedPrecisionPolicy``'s ``param_dtype`` (``None``
    without mixed precision). Integer storage (bitsandbytes' ``uint8`` default) is never cast by
    FSDP2 and always passes; a floating storage that differs from ``param_dtype`` would be cast
    as numbers, which garbles the packed bytes (a wrong loss with fp16, a shape error with fp32),
    so it is refused with the setting that fixes it.
    """
    count = 0
    for name, param in module.named_parameters():
        if type(param).__name__ != "Params4bit":
            continue
        count += 1
        storage = param.dtype
        if param_dtype is not None and storage.is_floating_point and storage != param_dtype:
            want = str(param_dtype).removeprefix("torch.")
            raise ConfigError(f"the 4-bit weights are stored as {str(storage).removeprefix('torch.')} ({name}), but "
                              f"FSDP's mixed precision casts parameters to {want}, which garbles packed 4-bit bytes",
                              where="adapter.quant_storage",
                              hint=f"adapter.quant_storage=uint8 (FSDP2 leaves it as is) or adapter.quant_storage={want}")
    return count


class QLoraAdapter(LoraAdapter):
    """LoRA over a 4-bit NF4 base.

    Args:
        compute_dtype: dtype of the dequantised matmuls; ``None`` follows ``trainer.precision``
            (bfloat16 for bf16 precisions, float16 for 16-mixed, float32 otherwise).
        quant_type: ``nf4`` or ``fp4``. double_quant: quantise the quantisation constants too.
        quant_storage: dtype holding the packed 4-bit weights (``bnb_4bit_quant_storage``): ``uint8``
            by default; under FSDP1 (one dtype per flat parameter) the compute dtype.
        skip_modules: linear layers kept in full precision (the output head by default).
        Other arguments as ``LoraAdapter``.
    """

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | str | None = None,
                 modules_to_save: list[str] | None = None, compute_dtype: str | None = None, quant_type: str = "nf4",
                 double_quant: bool = True, quant_storage: str = "uint8", skip_modules: list[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                         modules_to_save=modules_to_save, **kwargs)
        for key, value in (("compute_dtype", compute_dtype), ("quant_storage", quant_storage)):
            if value is not None and not isinstance(getattr(torch, str(value), None), torch.dtype):
                raise ConfigError(f"{value!r} is not a torch dtype", where=f"adapter.{key}",
                                  hint="e.g. bfloat16, float16, float32" + (", uint8" if key == "quant_storage" else ""))
        self.compute_dtype, self.quant_type, self.double_quant = compute_dtype, quant_type, double_quant
        self.quant_storage = quant_storage
        self.skip_modules = list(skip_modules) if skip_modules is not None else ["lm_head"]
        self.precision: str | None = None

    def resolved_compute_dtype(self) -> str:
        """``adapter.compute_dtype``, or the one ``trainer.precision`` implies."""
        return self.compute_dtype or compute_dtype_for(self.precision)

    def load_kwargs(self, precision: str | int | None = None) -> dict[str, Any]:
        """``from_pretrained`` arguments that load the base straight in 4 bits (see the module docstring)."""
        self.precision = None if precision is None else str(precision)
        return {**super().load_kwargs(precision), "quantization_config": bnb_quantization_config(self.resolved_compute_dtype(), self.quant_type,
                                                               self.double_quant, self.quant_storage,
                                                               self.skip_modules)}

    def apply(self, module: nn.Module, default_targets: list[str] | str | None = None,
              heads: list[str] | None = None) -> nn.Module:
        if continues_adapter(module):
            return super().apply(module, default_targets, heads)  # loaded in 4 bits, adapter trainable: as it is
        already = any(type(m).__name__ == "Linear4bit" for m in module.modules())
        if not already:
            if quantize_linears(module, skip=self.skip_modules + list(self._heads(heads) or []),
                                compute_dtype=getattr(torch, self.resolved_compute_dtype()),
                                quant_type=self.quant_type, double_quant=self.double_quant,
                                quant_storage=getattr(torch, self.quant_storage)) == 0:
                raise ConfigError("the model has no nn.Linear layer to quantise", where="adapter=qlora")
        module.requires_grad_(False)
        return super().apply(module, default_targets, heads)

    def save(self, module: nn.Module, directory: str | Path) -> None:
        module.save_pretrained(str(directory))
