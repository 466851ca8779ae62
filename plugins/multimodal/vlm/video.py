"""Video in records: a file (read by transformers' ``load_video`` with PyAV) or a list of frame images.

Frames are sampled here, once per video, so that every family's video processor gets the same
frames (``do_sample_frames=False``): ``data.video_frames`` uniformly spaced frames (the default), or
``data.video_fps`` frames per second of the file's own timing. A list of frames has no timing: it is
sampled by count only. A file needs the ``video`` extra (PyAV); a list of frames needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modalforge.data.errors import DataError
from modalforge.data.images import ImageRef, open_image, resolve_image_path

VIDEO_KEYS = ("mp4", "webm", "mkv", "avi", "mov")


@dataclass(frozen=True)
class VideoRef:
    """Where a video is: a file ``path``, or its ``frames`` in order."""

    path: str | None = None
    frames: tuple[ImageRef, ...] = ()
    where: str = ""

    def describe(self) -> str:
        return self.path or f"{len(self.frames)} frames from {self.frames[0].describe() if self.frames else self.where}"


def video_ref(value: Any, manifest: str, where: str, image_ref: Any) -> VideoRef:
    """A ``VideoRef`` for a path, a ``{"path"|"url"}`` dict, or a list of frames (each what ``image_ref`` takes)."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("url") or value.get("frames")
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError("a video's frame list is empty", source=where)
        return VideoRef(frames=tuple(image_ref(frame) for frame in value), where=where)
    if not isinstance(value, str) or not value:
        raise DataError(f"a video reference must be a file path or a list of frames, got {value!r}", source=where)
    if value.startswith(("http://", "https://")):
        raise DataError(f"video {value!r} is a URL; download the videos and give local paths", source=where)
    return VideoRef(path=resolve_image_path(value, manifest), where=where)


def missing_file(ref: VideoRef) -> str | None:
    """The first file of the video that does not exist, or ``None``."""
    paths = [ref.path] if ref.path is not None else [f.path for f in ref.frames if f.path is not None]
    return next((p for p in paths if not Path(p).is_file()), None)


def uniform_indices(total: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly over ``total`` frames (all of them when there are fewer)."""
    if total <= count:
        return list(range(total))
    return np.linspace(0, total - 1, count).round().astype(int).tolist()


def load_frames(ref: VideoRef, num_frames: int | None, fps: float | None) -> list[Any]:
    """The sampled frames as RGB PIL images, or a ``DataError`` naming the video."""
    from PIL import Image

    if ref.frames:
        frames = [open_image(frame) for frame in ref.frames]
        return [frames[i] for i in uniform_indices(len(frames), num_frames or len(frames))]
    try:
        from transformers.video_utils import load_video

        array, _ = load_video(ref.path, num_frames=None if fps else num_frames, fps=fps, backend="pyav")
    except ImportError as err:
        raise DataError(f"reading video files needs PyAV ({err}): pip install 'modalforge[video]', or give the "
                        "video as a list of frame images", source=ref.describe()) from None
    except Exception as err:  # noqa: BLE001 - av/transformers raise many types for one cause: the file
        raise DataError(f"unreadable video ({type(err).__name__}: {err})", source=ref.describe()) from None
    if len(array) == 0:
        raise DataError("the video has no frames", source=ref.describe())
    return [Image.fromarray(np.asarray(frame)).convert("RGB") for frame in array]
