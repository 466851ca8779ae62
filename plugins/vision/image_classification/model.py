"""Model builders for image_classification: torchvision, timm and Hugging Face classifiers.

``name`` picks the family: a torchvision model name (``resnet18``, ``vit_b_16``...),
``vit_custom`` (torchvision's VisionTransformer with the sizes in ``arch``, the small
offline default), ``timm:<name>``, or ``hf:<hub id or folder>``. The classification
head is always sized to the dataset's classes; ``weights`` (a local state-dict file)
loads everything but a head of another size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.models import offline_hint

log = logging.getLogger(__name__)


def _load_weights(model: nn.Module, weights: str) -> None:
    path = Path(weights).expanduser()
    if not path.exists():
        raise ModalforgeError(f"model.weights={weights!r} does not exist (give a .pth/.pt/.safetensors state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(kept))
    model.load_state_dict(kept, strict=False)
    log.info("loaded %d tensors from %s; skipped %d (new head or unknown keys): %s", len(kept), path, len(skipped),
             skipped[:6])


def build_image_classifier(name: str = "vit_custom", num_classes: int = 10, image_size: int = 224,
                           weights: str | None = None, arch: dict[str, Any] | None = None) -> nn.Module:
    """An image classifier with ``num_classes`` outputs (see the module docstring for ``name``)."""
    arch = dict(arch or {})
    if name.startswith("hf:"):
        from transformers import AutoModelForImageClassification

        source = name[3:]
        try:
            return AutoModelForImageClassification.from_pretrained(source, num_labels=num_classes,
                                                                   ignore_mismatched_sizes=True, **arch)
        except Exception as err:  # noqa: BLE001
            raise offline_hint(source, err) from err
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[5:], pretrained=False, num_classes=num_classes, **arch)
    elif name == "vit_custom":
        from torchvision.models import VisionTransformer

        settings = {"patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 64, "mlp_dim": 128, **arch}
        model = VisionTransformer(image_size=image_size, num_classes=num_classes, **settings)
    else:
        import torchvision

        if name not in torchvision.models.list_models():
            raise ModalforgeError(f"model.name={name!r} is not a torchvision model; use one of "
                                  f"torchvision.models.list_models(), vit_custom, timm:<name> or hf:<id or folder>")
        if name.startswith("vit_"):
            arch.setdefault("image_size", image_size)
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **arch)
    if weights:
        _load_weights(model, weights)
    return model


def classifier_heads(model: nn.Module, num_classes: int) -> list[str]:
    """Names of the linear layers that produce the class logits (trained in full under LoRA)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.out_features == num_classes]


def body_linears(model: nn.Module, heads: list[str]) -> list[str]:
    """Linear layers a LoRA adapter should target: all but the heads and attention's fused projections.

    ``nn.MultiheadAttention`` reads its ``out_proj`` weight directly instead of calling it,
    so an adapter there would never run.
    """
    inside_mha = {f"{name}.out_proj" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in heads and name not in inside_mha]
