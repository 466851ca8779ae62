"""Open images from files or shard bytes, with errors that name the file.

PIL's own errors ("cannot identify image file <_io.BytesIO ...>") name no file
and no shard key; every vision plugin reads images through here instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from modalforge.data.errors import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "image")


@dataclass(frozen=True)
class ImageRef:
    """Where an image is: a file path, or bytes from a shard sample (``where`` names shard and key)."""

    path: str | None = None
    data: bytes | None = None
    where: str = ""

    def describe(self) -> str:
        return self.path or self.where


def open_image(ref: ImageRef):  # noqa: ANN201 - PIL.Image.Image
    """The image as RGB, or a ``DataError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        if ref.path is not None:
            with Image.open(ref.path) as image:
                return image.convert("RGB")
        with Image.open(io.BytesIO(ref.data or b"")) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError("image file not found", source=ref.describe()) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"unreadable image ({type(err).__name__}: {err})", source=ref.describe()) from None


def image_problem(ref: ImageRef) -> str | None:
    """What is wrong with an image, by a cheap header check (PIL ``verify``), or ``None`` if it reads."""
    from PIL import Image

    try:
        with Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data or b"")) as image:
            image.verify()
        return None
    except FileNotFoundError:
        return "image file not found"
    except Exception as err:  # noqa: BLE001 - any failure means "not readable"
        return f"unreadable image ({type(err).__name__}: {err})"


def is_readable(ref: ImageRef) -> bool:
    """A cheap header check, used to skip bad images up front when asked."""
    return image_problem(ref) is None


def resolve_image_path(value: str, manifest: str) -> str:
    """A manifest's image path: absolute, or relative to the manifest's folder."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else Path(manifest).parent / path)


def image_from_sample(sample: dict, where: str) -> ImageRef | None:
    """The image of a webdataset sample (``jpg``/``png``/... key), if it has one."""
    for key in IMAGE_KEYS:
        if isinstance(sample.get(key), bytes):
            return ImageRef(data=sample[key], where=where)
    return None
