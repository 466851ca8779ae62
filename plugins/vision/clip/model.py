"""CLIP model builder: open_clip architectures by name, or a small custom config."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from modalforge.models import offline_hint


def build_clip(name: str | None = None, pretrained: str | None = None, embed_dim: int = 64,
               vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None, image_size: int = 224,
               context_length: int = 77, siglip: bool = False) -> nn.Module:
    """An open_clip ``CLIP``.

    Args:
        name: an open_clip architecture (``ViT-B-32``...); ``None`` builds from ``embed_dim``/``vision``/``text``.
        pretrained: weights for ``name``: an open_clip tag (needs network) or a local checkpoint file.
        embed_dim / vision / text: the custom architecture (``CLIPVisionCfg`` / ``CLIPTextCfg`` fields).
        image_size / context_length: from the data (hints).
        siglip: initialise the logit scale and bias as SigLIP does (scale 10, bias -10).
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    if name:
        try:
            return open_clip.create_model(name, pretrained=pretrained, force_image_size=image_size,
                                          force_context_length=context_length, **extra)
        except Exception as err:  # noqa: BLE001
            raise offline_hint(pretrained or name, err, what="open_clip weights") from err
    vision_cfg = CLIPVisionCfg(**_vision_kwargs(vision, image_size))
    text_cfg = CLIPTextCfg(**_text_kwargs(text, context_length))
    return open_clip.CLIP(embed_dim, vision_cfg, text_cfg, **extra)


def _vision_kwargs(vision: dict[str, Any] | None, image_size: int) -> dict[str, Any]:
    return {"layers": 2, "width": 64, "patch_size": 4, "head_width": 32, **(vision or {}), "image_size": image_size}


def _text_kwargs(text: dict[str, Any] | None, context_length: int) -> dict[str, Any]:
    return {"layers": 2, "width": 64, "heads": 2, **(text or {}), "context_length": context_length}


def open_clip_model_cfg(name: str | None = None, embed_dim: int = 64, vision: dict[str, Any] | None = None,
                        text: dict[str, Any] | None = None, image_size: int = 224, context_length: int = 77,
                        siglip: bool = False, **_: Any) -> dict[str, Any]:
    """The ``model_cfg`` open_clip's own loader wants (``create_model('local-dir:<final>')``) for what
    :func:`build_clip` builds with the same arguments."""
    import copy

    import open_clip

    extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if siglip else {}
    if name:
        cfg = copy.deepcopy(open_clip.get_model_config(name)) or {}
        cfg.setdefault("vision_cfg", {})["image_size"] = image_size
        cfg.setdefault("text_cfg", {})["context_length"] = context_length
        return {**cfg, **extra}
    return {"embed_dim": embed_dim, "vision_cfg": _vision_kwargs(vision, image_size),
            "text_cfg": _text_kwargs(text, context_length), **extra}
