"""Interleaved image-text records, normalised to text with image placeholders plus a list of images.

Detected per record (or forced with ``data.format=``):

- ``messages``: HF/TRL chat, ``content`` a string or a list of ``{"type": "image"}`` /
  ``{"type": "video"}`` / ``{"type": "text", "text": ...}`` parts with the images in an ``images`` list
  and the videos in a ``videos`` list (or inline: ``{"type": "video", "video": ...}``); OpenAI
  ``{"type": "image_url", "image_url": {"url": <path or data: URL>}}`` parts carry their image inline;
- ``llava``: LLaVA's JSON, ``image`` (one path or a list) + ``conversations`` with ``<image>`` in the text
  (turns read by the sft plugin's ShareGPT code); LLaVA-Video's records have a ``video`` and mark it
  ``<image>`` (or ``<video>``) in the text;
- ``document``: interleaved web documents for pretraining: OBELICS-style parallel ``texts`` / ``images``
  lists (one of the two ``null`` at each position), or MMC4-style ``text_list`` + ``image_info``
  (``image_name``/``path`` and ``matched_text_index``: the image goes before that sentence);
- ``caption``: ``image`` + ``caption`` (or ``text``/``txt``): the image then its caption.

Chats learn from assistant turns only (``data.train_on``); documents and captions from all their
text. Image references are paths relative to the record's file, ``data:`` URLs, bytes, or, in a
webdataset shard, the name of one of the sample's files (``"0.png"``; a lone image may be implicit).
A video is a file path (``mp4``... read with PyAV) or a list of frame images (:mod:`.video`).

Empty values / truncated media / duplicates / mixed types: a blank caption, a blank assistant turn
and an empty image reference are errors naming the record; so is a text (a content part, a
document sentence) that is not a string, never ``str()``'d (``None`` would train the word "None").
A missing image file is an error at read time; a cut or unreadable one when it is opened, naming
the record and the file. Repeated records and images are kept as they are.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modalforge.data.errors import DataError
from modalforge.data.images import IMAGE_KEYS, ImageRef, resolve_image_path
from modalforge.data.readers import Record
from modalforge.plugins.multimodal.vlm.video import VideoRef, missing_file, video_ref
from modalforge.text.formats import Message, to_messages

FORMATS = ("messages", "llava", "document", "caption")
VIDEO_PLACEHOLDER = "<video>"
CAPTION_KEYS = ("caption", "text", "txt")


@dataclass
class Sample:
    """One record: chat ``messages`` (string contents) or a ``text``, with ``placeholder`` where images go."""

    images: list[ImageRef]
    where: str
    source: str
    location: str
    messages: list[Message] | None = None
    text: str | None = None
    caption: str | None = None  # a ``caption`` record's caption (``text`` is the placeholder then it)
    videos: list[VideoRef] = field(default_factory=list)  # in the order of their placeholders

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def error(self, message: str) -> DataError:
        return DataError(message, source=self.source, location=self.location)


def detect_format(data: dict[str, Any]) -> str | None:
    if isinstance(data.get("messages"), list):
        return "messages"
    if isinstance(data.get("conversations"), list):
        return "llava"
    if ("texts" in data and "images" in data) or "text_list" in data:
        return "document"
    if any(isinstance(data.get(k), str) for k in CAPTION_KEYS) and (
            "image" in data or any(isinstance(data.get(k), bytes) for k in IMAGE_KEYS)):
        return "caption"
    return None


def _fail(record: Record, message: str) -> DataError:
    return DataError(message, source=record.source, location=record.location)


def image_ref(value: Any, record: Record) -> ImageRef:
    """An ``ImageRef`` for a path, a ``data:`` URL, bytes, a ``{"path"|"bytes"|"url"}`` dict or a PIL image."""
    where = record.where()
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path") or value.get("url") or (value.get("image_url") or {})
        if isinstance(value, dict):
            value = value.get("url")
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value), where=where)
    if hasattr(value, "convert") and hasattr(value, "save"):  # a PIL image (HF datasets Image feature)
        buffer = io.BytesIO()
        value.convert("RGB").save(buffer, format="PNG")
        return ImageRef(data=buffer.getvalue(), where=where)
    if not isinstance(value, str) or not value:
        raise _fail(record, f"an image reference must be a path, a data: URL or bytes, got {value!r}")
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header:
            raise _fail(record, f"data URL image is not base64 ({header[:40]!r})")
        try:
            return ImageRef(data=base64.b64decode(payload, validate=True), where=where)
        except ValueError as err:
            raise _fail(record, f"data URL image does not decode: {err}") from None
    if value.startswith(("http://", "https://")):
        raise _fail(record, f"image {value!r} is a URL; download the images and give local paths")
    if record.source.endswith(".tar"):  # a webdataset shard: the name of one of the sample's files
        data = record.data.get(value) or record.data.get(value.rsplit(".", 1)[-1] if "." in value else value)
        if isinstance(data, bytes):
            return ImageRef(data=data, where=f"{where}, file {value}")
    return ImageRef(path=resolve_image_path(value, record.source), where=where)


def _video(value: Any, record: Record) -> VideoRef:
    try:
        return video_ref(value, record.source, record.where(), lambda frame: image_ref(frame, record))
    except DataError as err:
        raise _fail(record, err.detail) from None


def _shard_images(record: Record) -> list[Any]:
    """The images of a shard sample, in file-name order (``0.png``, ``1.png``... or ``jpg``)."""
    keys = sorted(k for k in record.data if not k.startswith("__") and k.rsplit(".", 1)[-1].lower() in IMAGE_KEYS
                  and isinstance(record.data[k], bytes))
    return [record.data[k] for k in keys]


def _image_list(record: Record, value: Any) -> list[Any]:
    if value is None:
        return _shard_images(record) if record.source.endswith(".tar") else []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _messages(record: Record, placeholder: str) -> tuple[list[Message], list[ImageRef], list[VideoRef]]:
    listed = [image_ref(v, record) for v in _image_list(record, record.data.get("images"))]
    listed_videos = [_video(v, record) for v in _videos(record.data.get("videos"))]
    inline: list[ImageRef] = []
    inline_videos: list[VideoRef] = []
    typed_parts = 0
    messages = []
    for i, message in enumerate(record.data["messages"]):
        if not isinstance(message, dict) or "role" not in message:
            raise _fail(record, f"message {i} has no 'role' (expected {{'role': ..., 'content': ...}})")
        content = message.get("content")
        if isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(_text(part.get("text"), record, f"message {i} text part"))
                elif kind == "image":
                    typed_parts += 1
                    pieces.append(placeholder)
                    inner = part.get("image") or part.get("path") or part.get("url")
                    if inner is not None:
                        inline.append(image_ref(inner, record))
                elif kind == "image_url":
                    pieces.append(placeholder)
                    url = part.get("image_url")
                    inline.append(image_ref(url.get("url") if isinstance(url, dict) else url, record))
                elif kind == "video":
                    pieces.append(VIDEO_PLACEHOLDER)
                    inner = part.get("video") or part.get("path") or part.get("url")
                    if inner is not None:
                        inline_videos.append(_video(inner, record))
                else:
                    raise _fail(record, f"message {i}: content part {part!r} is not a text, image, video or "
                                        "image_url part")
            content = "".join(pieces)
        messages.append({**message, "content": content})
    if inline and listed:
        raise _fail(record, "images are given both inline (content parts) and in 'images'; use one")
    if inline_videos and listed_videos:
        raise _fail(record, "videos are given both inline (content parts) and in 'videos'; use one")
    return messages, inline or listed, inline_videos or listed_videos


def _videos(value: Any) -> list[Any]:
    """A record's ``videos`` (TRL's: a list, each a path or a list of frames); a lone path is one video."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _document(record: Record, placeholder: str) -> tuple[str, list[ImageRef]]:
    data = record.data
    if "text_list" in data:  # MMC4
        texts = [_text(t, record, f"text_list[{j}]") for j, t in enumerate(data["text_list"])]
        before: dict[int, list[Any]] = {}
        for info in data.get("image_info") or []:
            index = info.get("matched_text_index")
            if not isinstance(index, int) or not 0 <= index < len(texts):
                raise _fail(record, f"image_info entry {info!r} has no valid matched_text_index (0..{len(texts) - 1})")
            before.setdefault(index, []).append(info.get("path") or info.get("image_name") or info.get("image"))
        pieces, images = [], []
        for i, text in enumerate(texts):
            for ref in before.get(i, []):
                pieces.append(placeholder)
                images.append(image_ref(ref, record))
            pieces.append(text)
        return " ".join(pieces), images
    texts, refs = list(data["texts"] or []), list(data["images"] or [])
    if len(texts) != len(refs):
        raise _fail(record, f"'texts' has {len(texts)} entries and 'images' {len(refs)}; they must be parallel "
                            "lists with null where the other one has an item")
    pieces, images = [], []
    for text, ref in zip(texts, refs):
        if (text is None) == (ref is None):
            raise _fail(record, "each position of 'texts'/'images' must hold exactly one of a text and an image")
        if ref is not None:
            pieces.append(placeholder)
            images.append(image_ref(ref, record))
        else:
            pieces.append(_text(text, record, "a 'texts' entry"))
    return " ".join(pieces), images


def _text(value: Any, record: Record, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(record, f"{what} is {type(value).__name__} {value!r}, expected a string")
    return value


def parse_record(record: Record, fmt: str | None, placeholder: str) -> Sample:
    """A :class:`Sample`, or a ``DataError`` naming the record and what is wrong with it."""
    if record.source.endswith(".tar") and isinstance(record.data.get("json"), dict):  # shard: record + its files
        record = Record({**{k: v for k, v in record.data.items() if k != "json"}, **record.data["json"]},
                        record.source, record.location)
    fmt = fmt or detect_format(record.data)
    if fmt not in FORMATS:
        raise _fail(record, f"record fits none of the formats {', '.join(FORMATS)} (keys present: "
                            f"{sorted(k for k in record.data if not k.startswith('__'))}); set data.format= to force one")
    sample = Sample(images=[], where=record.where(), source=record.source, location=record.location)
    try:
        if fmt == "messages":
            sample.messages, sample.images, sample.videos = _messages(record, placeholder)
        elif fmt == "llava":
            view = Record({"conversations": record.data["conversations"]}, record.source, record.location)
            video = record.data.get("video")  # LLaVA-Video: one video, a path (or a list of frames)
            sample.videos = [] if video is None else [_video(video, record)]
            # LLaVA-Video marks its video <image>: with a video and no image, <image> is the video's place
            marker = VIDEO_PLACEHOLDER if sample.videos and record.data.get("image") is None else placeholder
            sample.messages = [{**m, "content": str(m.get("content") or "").replace("<image>", marker)}
                               for m in to_messages(view, "sharegpt")]
            sample.images = [image_ref(v, record) for v in _image_list(record, record.data.get("image"))]
        elif fmt == "document":
            sample.text, sample.images = _document(record, placeholder)
        else:
            caption = next(record.data[k] for k in CAPTION_KEYS if isinstance(record.data.get(k), str)).strip()
            if not caption:
                raise _fail(record, "the caption is empty: nothing to learn")
            sample.text, sample.caption = placeholder + caption, caption
            sample.images = [image_ref(v, record) for v in _image_list(record, record.data.get("image"))][:1]
    except KeyError as err:
        raise _fail(record, f"format {fmt!r} needs field {err.args[0]!r}; keys present: "
                            f"{sorted(k for k in record.data if not k.startswith('__'))}") from None
    check_sample(sample, placeholder)
    return sample


def count_placeholders(sample: Sample, placeholder: str) -> int:
    """How many times ``placeholder`` occurs in the sample's texts."""
    if sample.messages is not None:
        return sum(str(m.get("content") or "").count(placeholder) for m in sample.messages)
    return (sample.text or "").count(placeholder)


def check_sample(sample: Sample, placeholder: str) -> None:
    """Placeholders match images and videos, a chat has an assistant turn, every image and video file exists."""
    found = count_placeholders(sample, placeholder)
    if found != len(sample.images):
        raise sample.error(f"{found} image placeholder(s) ({placeholder}) but {len(sample.images)} image(s); "
                           "each image needs exactly one placeholder where it goes in the text")
    found = count_placeholders(sample, VIDEO_PLACEHOLDER)
    if found != len(sample.videos):
        raise sample.error(f"{found} video placeholder(s) ({VIDEO_PLACEHOLDER}) but {len(sample.videos)} "
                           "video(s); each video needs exactly one placeholder where it goes in the text")
    for video in sample.videos:
        missing = missing_file(video)
        if missing is not None:
            raise sample.error(f"video file not found: {missing}")
    if sample.messages is not None and not any(m["role"] == "assistant" for m in sample.messages):
        raise sample.error("the conversation has no assistant message to learn from")
    blank = next((i for i, m in enumerate(sample.messages or []) if m["role"] == "assistant"
                  and not m.get("tool_calls") and not str(m.get("content") or "").strip()), None)
    if blank is not None:
        raise sample.error(f"message {blank} (assistant) is empty: it would teach the model to answer nothing")
    for ref in sample.images:
        if ref.path is not None and not Path(ref.path).is_file():
            raise sample.error(f"image file not found: {ref.path}")


def final_answer(sample: Sample) -> tuple[list[Message], str] | None:
    """(prompt messages, reference answer) when the chat ends with an assistant answer to a user turn."""
    if not sample.messages or sample.messages[-1]["role"] != "assistant":
        return None
    return sample.messages[:-1], str(sample.messages[-1].get("content") or "")

