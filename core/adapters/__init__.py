"""How parameters are trained: full, freeze, and PEFT methods (LoRA, DoRA, IA3, QLoRA) on any nn.Module."""

from modalforge.adapters.freeze import FreezeAdapter, FullAdapter
from modalforge.adapters.peft_adapters import DoraAdapter, IA3Adapter, LoraAdapter
from modalforge.adapters.qlora import QLoraAdapter, bnb_quantization_config, quantize_linears
from modalforge.adapters.utils import enable_gradient_checkpointing, trainable_parameter_summary

__all__ = [
    "DoraAdapter",
    "FreezeAdapter",
    "FullAdapter",
    "IA3Adapter",
    "LoraAdapter",
    "QLoraAdapter",
    "bnb_quantization_config",
    "enable_gradient_checkpointing",
    "quantize_linears",
    "trainable_parameter_summary",
]
