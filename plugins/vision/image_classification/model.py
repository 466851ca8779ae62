"""Model builders for image_classification: torchvision, timm and Hugging Face classifiers.

``name`` picks the family: a torchvision model name (``resnet18``, ``vit_b_16``...),
``vit_custom`` (torchvision's VisionTransformer with the sizes in ``arch``, the small
offline default), ``timm:<name>``, or ``hf:<hub id or folder>``. The classification
head is always sized to the dataset's classes; ``weights`` (a local state-dict file)
loads everything but a head of another size.

:func:`build_clip_tower_classifier` starts from another run instead: the image tower
of a ``clip`` run's ``final/`` plus a new linear head (a linear probe with
``freeze_backbone=True``, a fine-tune otherwise).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

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


# ---- starting from a clip run ---------------------------------------------------------------
CLIP_CONFIG = "open_clip_config.json"
CLIP_WEIGHTS = "open_clip_model.safetensors"
CLIP_PREPROCESS = "preprocess_config.json"


class CLIPTowerClassifier(nn.Module):
    """A CLIP image tower (``backbone``) and a linear ``head`` on its pooled, projected features.

    Images arrive normalised with the classification data's ``mean``/``std``; ``input_scale``
    and ``input_shift`` turn them into the normalisation the tower was trained with, so the
    tower sees what it saw in the clip run. With ``freeze_backbone`` the tower stays frozen
    and in eval mode whatever the adapter asks (``full`` unfreezes its whole target), so a
    linear probe needs no ``adapter=freeze`` pattern.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, freeze_backbone: bool,
                 input_scale: torch.Tensor, input_shift: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        self.freeze_backbone = freeze_backbone
        self.register_buffer("input_scale", input_scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_shift", input_shift.view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images * self.input_scale + self.input_shift))

    def requires_grad_(self, requires_grad: bool = True) -> "CLIPTowerClassifier":
        super().requires_grad_(requires_grad)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "CLIPTowerClassifier":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self


def _read_json(path: Path, where: str) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModalforgeError(f"cannot read {path}: {err}", where=where) from err


def load_clip_tower(path: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The image tower of a clip run's ``final/`` (weights included), its builder kwargs and preprocessing.

    The clip plugin saves the open_clip model with the builder that made it and that
    builder's arguments; the whole CLIP is rebuilt that way and only ``visual`` kept.
    """
    from hydra.utils import get_object
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / CLIP_CONFIG).exists() and (folder / "final" / CLIP_CONFIG).exists():
        folder = folder / "final"  # a clip run directory instead of its final/
    if not (folder / CLIP_CONFIG).exists() or not (folder / CLIP_WEIGHTS).exists():
        what = "does not exist" if not folder.exists() else f"holds no {CLIP_CONFIG} + {CLIP_WEIGHTS}"
        raise ModalforgeError(f"{folder} {what}", where="model.path",
                              hint="point model.path at the final/ folder of a `train plugin=clip` run")
    saved = _read_json(folder / CLIP_CONFIG, "model.path")
    kwargs = dict(saved.get("kwargs") or {})
    kwargs.pop("pretrained", None)  # the clip run's own weights replace them below; never reach a hub for them
    if not saved.get("builder"):  # the clip plugin names the builder that made the model; nothing is guessed
        raise ModalforgeError(f"{folder / CLIP_CONFIG} names no builder (not written by `train plugin=clip`?)",
                              where="model.path")
    builder = get_object(str(saved["builder"]))
    visual = builder(**{k: v for k, v in kwargs.items() if k != "_target_"}).visual
    state = load_file(str(folder / CLIP_WEIGHTS))
    tower_state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not tower_state:
        raise ModalforgeError(f"{folder / CLIP_WEIGHTS} holds no visual.* tensors (an adapter-only export?)",
                              where="model.path", hint="export the clip run merged: checkpoint.export_merged=true")
    try:
        visual.load_state_dict(tower_state)
    except RuntimeError as err:
        raise ModalforgeError(f"the image tower in {folder} does not match {CLIP_CONFIG}: "
                              f"{str(err).splitlines()[0]}", where="model.path") from err
    preprocess = _read_json(folder / CLIP_PREPROCESS, "model.path") if (folder / CLIP_PREPROCESS).exists() else {}
    return visual, kwargs, preprocess


def build_clip_tower_classifier(path: str, num_classes: int = 10, image_size: int | None = None,
                                freeze_backbone: bool = False, input_mean: Sequence[float] | None = None,
                                input_std: Sequence[float] | None = None) -> nn.Module:
    """A classifier on the image tower of a clip run (see :class:`CLIPTowerClassifier`).

    Args:
        path: the clip run's ``final/`` (or its run directory).
        num_classes: from the data.
        image_size: the data's image size (a hint); must be the tower's.
        freeze_backbone: ``True``: a linear probe (only the head trains); ``False``: fine-tune all.
        input_mean / input_std: the normalisation the classification data applies (``data.mean`` /
            ``data.std``); ``None`` passes images to the tower as they come.
    """
    tower, kwargs, preprocess = load_clip_tower(path)
    tower_size = kwargs.get("image_size") or preprocess.get("image_size")
    if image_size is not None and tower_size is not None and int(image_size) != int(tower_size):
        raise ModalforgeError(f"is {image_size} but the CLIP image tower in {path} takes {tower_size}x{tower_size} "
                              "images", where="data.image_size", hint=f"set data.image_size={tower_size}")
    channels = 3
    scale, shift = torch.ones(channels), torch.zeros(channels)
    clip_mean, clip_std = preprocess.get("mean"), preprocess.get("std")
    if input_mean is not None and input_std is not None and clip_mean and clip_std:
        # data gives x = (raw - m_in) / s_in; the tower wants (raw - m_clip) / s_clip
        m_in, s_in = torch.tensor(list(input_mean), dtype=torch.float32), torch.tensor(list(input_std), dtype=torch.float32)
        m_c, s_c = torch.tensor(clip_mean, dtype=torch.float32), torch.tensor(clip_std, dtype=torch.float32)
        scale, shift = s_in / s_c, (m_in - m_c) / s_c
    feature_dim = getattr(tower, "output_dim", None)
    if not feature_dim:
        size = int(tower_size or image_size or 224)
        with torch.no_grad():
            feature_dim = tower(torch.zeros(1, channels, size, size)).shape[-1]
    return CLIPTowerClassifier(tower, int(feature_dim), num_classes, freeze_backbone, scale, shift)
