"""Train / eval image transforms (torchvision v2) and MixUp/CutMix batch mixing."""

from __future__ import annotations

from typing import Any, Callable

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(image_size: int, train: bool, augment: str = "standard",
                    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Callable:
    """``standard``: random resized crop + flip for training; resize + centre crop for evaluation.

    ``none`` resizes only (for data whose geometry carries the label).
    """
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and augment == "standard":
        head = [v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    elif augment in ("standard", "none"):
        head = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    else:
        raise ValueError(f"data.augment={augment!r} is not one of: standard, none")
    return v2.Compose(head + tail)


def build_batch_mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> Callable[[Any, Any], Any] | None:
    """torchvision's MixUp and/or CutMix (one of them per batch), or ``None`` when both are off."""
    from torchvision.transforms import v2

    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
