"""DreamBooth prior preservation: the class images and their prompt, as diffusers' train_dreambooth*.py.

``objective.prior.class_data_dir`` holds the class images; when it has fewer than
``objective.prior.num_class_images``, the missing ones are generated from ``objective.prior.class_prompt``
by the base model (the denoiser and its helpers as loaded, before any training step), as the
script does with the base pipeline, and saved there for the next run. Each training step pairs
the instance batch with as many class images (taken in turn), captioned with the class prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from modalforge.errors import ModalforgeError
from modalforge.plugins.vision.diffusion.data import IMAGE_SUFFIXES, ImageItems, Item, build_transform
from modalforge.data.images import ImageRef
from modalforge.progress import preparing

log = logging.getLogger(__name__)


def class_image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def ensure_class_images(folder: str | Path, count: int, generate: Callable[[int], torch.Tensor],
                        batch_size: int = 16) -> list[Path]:
    """At least ``count`` images in ``folder``: the missing ones from ``generate(n)`` (``(n, 3, H, W)`` in ``[0, 1]``)."""
    from torchvision.utils import save_image

    folder = Path(folder).expanduser()
    files = class_image_files(folder)
    missing = count - len(files)
    if missing > 0:
        folder.mkdir(parents=True, exist_ok=True)
        start = len(files)
        with preparing("diffusion: generating class images with the base model", total=missing, unit="image",
                       cached_in=folder) as progress:
            while missing > 0:
                n = min(batch_size, missing)
                for i, image in enumerate(generate(n)):
                    save_image(image.float().cpu(), str(folder / f"class_{start + i:05d}.png"))
                start, missing = start + n, missing - n
                progress.update(n)
        files = class_image_files(folder)
    return files[:count]


def load_class_images(folder: str, count: int, image_size: int,
                      generate: Callable[[int], torch.Tensor]) -> "ClassImages":
    """The class images, generated first (rank zero; the others wait) where fewer than ``count`` exist."""
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        ensure_class_images(folder, count, generate)
    if distributed:
        dist.barrier()
    return ClassImages(class_image_files(Path(folder).expanduser())[:count], image_size)


class ClassImages:
    """The class images as training tensors in ``[-1, 1]``, served in turn, ``n`` at a time."""

    def __init__(self, files: list[Path], image_size: int) -> None:
        if not files:
            raise ModalforgeError("objective.prior.class_data_dir holds no images and objective.prior.num_class_images is 0")
        items = [Item(ImageRef(path=str(f)), None, None) for f in files]
        self.images = ImageItems(items, build_transform(image_size, False), {})
        self.position = 0

    def __len__(self) -> int:
        return len(self.images)

    def take(self, n: int) -> torch.Tensor:
        batch = [self.images[(self.position + i) % len(self.images)][0] for i in range(n)]
        self.position = (self.position + n) % len(self.images)
        return torch.stack(batch)
