"""How parameters are trained: full, freeze, and PEFT methods (LoRA, DoRA, IA3, QLoRA) on any nn.Module."""

from modalforge.adapters.freeze import FreezeAdapter, FullAdapter
from modalforge.adapters.peft_adapters import DoraAdapter, IA3Adapter, LoraAdapter
from modalforge.adapters.loading import adapter_load_kwargs, pretrained_load_kwargs, pretrained_loading
from modalforge.adapters.qlora import (QLoraAdapter, bnb_quantization_config, check_fsdp_quant_storage, compute_dtype_for,
                                       quantize_linears)
from modalforge.adapters.stages import adapter_folder, config_source, continues_adapter, export_merged_by_default
from modalforge.adapters.utils import enable_gradient_checkpointing, trainable_parameter_summary

__all__ = [
    "DoraAdapter",
    "FreezeAdapter",
    "FullAdapter",
    "IA3Adapter",
    "LoraAdapter",
    "QLoraAdapter",
    "adapter_folder",
    "adapter_load_kwargs",
    "bnb_quantization_config",
    "check_fsdp_quant_storage",
    "compute_dtype_for",
    "config_source",
    "continues_adapter",
    "enable_gradient_checkpointing",
    "export_merged_by_default",
    "pretrained_load_kwargs",
    "pretrained_loading",
    "quantize_linears",
    "trainable_parameter_summary",
]
