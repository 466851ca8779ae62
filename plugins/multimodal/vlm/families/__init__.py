"""Image-text-to-text families beyond LLaVA: what each one's processor, template and tiny twin are.

One module per family (:mod:`.qwen2_vl`, :mod:`.gemma3`, :mod:`.idefics3`, :mod:`.llava_onevision`,
:mod:`.paligemma`, :mod:`.internvl`), each with the same names: ``MODEL_TYPES``, ``HUB_ID``, ``PACKING``, ``IMAGE_TEXT``,
``VIDEO_TEXT`` (``None``: no video), ``SPECIAL_TOKENS``, ``CHAT_TEMPLATE``, ``build_processor(tokenizer, image_size)`` and
``tiny_config(processor, sizes)``. A hub checkpoint of a family not listed here still trains (any
``AutoModelForImageTextToText`` with its ``AutoProcessor``); the table only adds a tiny twin for
offline runs and what cannot be read from the processor (whether packed rows are exact).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from modalforge.errors import ModalforgeError

NAMES = ("qwen2_vl", "gemma3", "idefics3", "llava_onevision", "paligemma", "internvl")


def family(name: str) -> ModuleType:
    """The family module called ``name`` (a ``model=vlm/<name>`` preset's ``model.family``)."""
    if name not in NAMES:
        raise ModalforgeError(f"model.family={name!r} is not a known vlm family; choose one of {', '.join(NAMES)} "
                              "(or leave it null and give model.name_or_path: any AutoModelForImageTextToText)")
    return importlib.import_module(f"{__name__}.{name}")


def family_of(model_type: str) -> ModuleType | None:
    """The family module covering a config's ``model_type``, or ``None`` for one this table does not list."""
    for name in NAMES:
        try:
            module = family(name)
        except ImportError:
            continue
        if model_type in module.MODEL_TYPES:
            return module
    return None


def tiny_text(tokenizer: Any, sizes: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A twin's language model config: 64 wide, 2 layers, 4 heads (2 kv), on ``tokenizer``'s vocabulary.

    ``sizes`` (``model.text``) may change the five sizes; widths stay multiples of 64 so that
    bitsandbytes' CPU 4-bit kernels take every layer (``adapter=qlora``)."""
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2}
    text.update({k: v for k, v in sizes.items() if k in text})
    return {**text, "vocab_size": len(tokenizer), "max_position_embeddings": 2048, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, **fields}


def check_image_size(name: str, image_size: int, multiple: int) -> None:
    """A twin's patch grid needs the image side to divide evenly."""
    if image_size % multiple:
        raise ModalforgeError(f"the {name} tiny twin takes square images whose side is a multiple of {multiple}, "
                              f"not data.image_size={image_size}")
