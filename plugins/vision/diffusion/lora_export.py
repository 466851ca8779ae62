"""LoRA weights in the format ``pipeline.load_lora_weights`` reads, written as diffusers' DreamBooth-LoRA
scripts write them: ``get_peft_model_state_dict`` -> ``convert_state_dict_to_diffusers`` -> the
pipeline class's ``save_lora_weights`` (``pytorch_lora_weights.safetensors``, with the LoRA config
as metadata so that ``lora_alpha`` survives the round trip).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def diffusers_lora_state(peft_model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(diffusers-format LoRA state dict, LoRA config as a dict) of a PEFT-wrapped denoiser."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # The core wraps the denoiser in a PeftModel; diffusers' scripts call add_adapter on the model
    # itself, whose keys lack the wrapper's "base_model.model." prefix.
    state = get_peft_model_state_dict(peft_model)
    prefix = "base_model.model."
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v.detach().cpu().contiguous() for k, v in state.items()}
    config = peft_model.peft_config["default"]
    metadata = config.to_dict()
    # Dropout is for training; diffusers' load_lora_weights leaves the denoiser in train mode, where a
    # LoRA dropout would make every generated image random.
    metadata["lora_dropout"] = 0.0
    metadata["target_modules"] = sorted(metadata["target_modules"]) if isinstance(
        metadata.get("target_modules"), (set, list)) else metadata.get("target_modules")
    return convert_state_dict_to_diffusers(state), metadata


def save_diffusers_lora(peft_model: nn.Module, directory: str | Path) -> Path | None:
    """Write ``pytorch_lora_weights.safetensors`` for a UNet (Stable Diffusion) or an SD3 transformer.

    Returns the file, or ``None`` for a denoiser no diffusers LoRA loader serves (DiT).
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    kind = type(peft_model.get_base_model()).__name__
    state, metadata = diffusers_lora_state(peft_model)
    if kind == "UNet2DConditionModel":
        StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=state,
                                                  unet_lora_adapter_metadata=metadata)
    elif kind == "SD3Transformer2DModel":
        StableDiffusion3Pipeline.save_lora_weights(str(directory), transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=metadata)
    else:
        return None
    return Path(directory) / LORA_WEIGHTS
