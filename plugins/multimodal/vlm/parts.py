"""The vision tower, projector and language model of any image-text-to-text model, found by name.

transformers names them per family (LLaVA, Gemma 3, PaliGemma, LLaVA-OneVision: ``vision_tower`` /
``multi_modal_projector`` / ``language_model``; Idefics3: ``vision_model`` / ``connector`` / ``text_model``;
Qwen2-VL: ``visual`` with its ``merger`` as the projector). Freezing, LoRA targets and the fully
trained projector under PEFT all read these, so one table serves every family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modalforge.errors import ModalforgeError

_TOWERS = ("vision_tower", "vision_model", "visual")
_PROJECTORS = ("multi_modal_projector", "connector", "merger")
_LANGUAGE = ("language_model", "text_model")


@dataclass
class Parts:
    tower: nn.Module
    projector: nn.Module
    projector_name: str  # its qualified name in the model, for PEFT's modules_to_save
    language_model: nn.Module
    lm_head: nn.Module


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _first(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    return next(((n, getattr(module, n)) for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def vlm_parts(model: nn.Module) -> Parts:
    """The parts of ``model`` (a ``*ForConditionalGeneration``, or its PEFT wrapper)."""
    top = base_model(model)
    inner = top.model
    tower, language = _first(inner, _TOWERS), _first(inner, _LANGUAGE)
    projector = _first(inner, _PROJECTORS)
    if projector is None and tower is not None:  # Qwen2-VL: the merger sits inside the vision model
        found = _first(tower[1], _PROJECTORS)
        projector = (f"{tower[0]}.{found[0]}", found[1]) if found else None
    if tower is None or language is None or projector is None:
        raise ModalforgeError(f"{type(top).__name__}: no vision tower / projector / language model found under "
                              f"the names {_TOWERS} / {_PROJECTORS} / {_LANGUAGE}")
    return Parts(tower[1], projector[1], f"model.{projector[0]}", language[1], top.get_output_embeddings())
