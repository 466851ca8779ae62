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
    vision_cfg = CLIPVisionCfg(**{"layers": 2, "width": 64, "patch_size": 4, "head_width": 32, **(vision or {}),
                                  "image_size": image_size})
    text_cfg = CLIPTextCfg(**{"layers": 2, "width": 64, "heads": 2, **(text or {}), "context_length": context_length})
    return open_clip.CLIP(embed_dim, vision_cfg, text_cfg, **extra)
