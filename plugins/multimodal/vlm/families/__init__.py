"""Image-text-to-text families beyond LLaVA: what each one's processor, template and tiny twin are.

One module per family (:mod:`.qwen2_vl`, :mod:`.gemma3`, :mod:`.idefics3`, :mod:`.llava_onevision`), each with the same names: ``MODEL_TYPES``, ``HUB_ID``, ``PACKING``, ``IMAGE_TEXT``,
``SPECIAL_TOKENS``, ``CHAT_TEMPLATE``, ``build_processor(tokenizer, image_size)`` and
``tiny_config(processor, sizes)``. A hub checkpoint of a family not listed here still trains (any
``AutoModelForImageTextToText`` with its ``AutoProcessor``); the table only adds a tiny twin for
offline runs and what cannot be read from the processor (whether packed rows are exact).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from modalforge.errors import ModalforgeError

NAMES = ("qwen2_vl", "gemma3", "idefics3", "llava_onevision")


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
