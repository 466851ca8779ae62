"""Image tokens as the model's own processor writes them, spliced into an already tokenised chat.

Families count image tokens differently (Qwen2-VL by the image's grid, Idefics3 by its tiles,
Gemma 3 with begin/end markers around soft tokens, LLaVA-OneVision by its any-res patches), so the
count is never computed here: the processor expands one image's placeholder text (``IMAGE_TEXT``, what
the chat template renders for an image part) and that expansion replaces the placeholder in the
token ids. The chat code's labels stay exact (image tokens are never learned), and whatever else the
processor returns rides along: per-token arrays (``mm_token_type_ids``, ``token_type_ids``) are spliced
the same way (0 on text), per-image tensors (``pixel_values``, ``image_grid_thw``, ``pixel_attention_mask``,
``image_sizes``...) are concatenated image by image in the collator, zero-padded where images differ
in tiles or patches (the models drop all-zero padding images and slice by ``image_sizes``).

Videos (sampled frames, :mod:`.video`) go the same way through the processor's video path
(``pixel_values_videos``, ``video_grid_thw``), in the order of their placeholders.

Hand-written: transformers' processors expand text strings, not token ids with a loss mask.
"""

from __future__ import annotations

from typing import Any

import torch

from modalforge.data.errors import DataError
from modalforge.text.tokenize import IGNORE

_TOKEN_KEYS = ("input_ids", "attention_mask")


class ProcessorImages:
    """Expansions and tensors of images (and videos), from an HF processor of any image-text-to-text family.

    ``video_text`` is what the family's template renders for a video part (``None``: the family takes no
    video); a video is its list of sampled frames (:mod:`.video`), expanded and processed like an image.
    """

    def __init__(self, processor: Any, image_text: str, settings: dict[str, Any] | None = None,
                 video_text: str | None = None) -> None:
        self.processor, self.image_text, self.settings = processor, image_text, dict(settings or {})
        self.video_text = video_text
        self.placeholder: list[int] = self._tokens(image_text)
        self.video_placeholder: list[int] = self._tokens(video_text) if video_text else []
        self._expansions: dict[tuple, tuple[list[int], dict[str, list[int]]]] = {}

    def _tokens(self, text: str) -> list[int]:
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"the placeholder text {text!r} tokenises to nothing")
        return ids

    def process(self, image: Any) -> dict[str, torch.Tensor]:
        """The processor's outputs for one image on its own."""
        out = self.processor(text=[self.image_text], images=[image], return_tensors="pt", add_special_tokens=False,
                             **self.settings)
        return dict(out)

    def process_video(self, frames: list[Any]) -> dict[str, torch.Tensor]:
        """The processor's outputs for one video (its frames, already sampled) on its own."""
        out = self.processor(text=[self.video_text], videos=[frames], return_tensors="pt", add_special_tokens=False,
                             do_sample_frames=False)
        return dict(out)

    def _expansion(self, key: tuple, outputs: Any) -> tuple[list[int], dict[str, list[int]]]:
        if key not in self._expansions:
            out = outputs()
            ids = out["input_ids"]
            arrays = {k: v[0].tolist() for k, v in out.items()
                      if k not in _TOKEN_KEYS and isinstance(v, torch.Tensor) and v.shape == ids.shape}
            self._expansions[key] = (ids[0].tolist(), arrays)
        return self._expansions[key]

    def expansion(self, image: Any) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids of one image (and its per-token arrays); one processor call per image size."""
        return self._expansion(("image", *image.size), lambda: self.process(image))

    def video_expansion(self, frames: list[Any]) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids of one video; one processor call per frame count and frame size."""
        return self._expansion(("video", len(frames), *frames[0].size), lambda: self.process_video(frames))

    @staticmethod
    def _positions(ids: list[int], placeholder: list[int]) -> list[int]:
        width, found, at = len(placeholder), [], 0
        while width and at <= len(ids) - width:
            if ids[at:at + width] == placeholder:
                found.append(at)
                at += width
            else:
                at += 1
        return found

    def _check_count(self, kind: str, text: str | None, found: int, given: int, where: Any) -> None:
        if found != given:
            raise DataError(f"{found} {kind} placeholder(s) {text!r} after tokenisation but {given} {kind}(s): "
                            "the chat template or tokenizer changed the placeholder",
                            source=getattr(where, "source", None), location=getattr(where, "location", None))

    def splice(self, ids: list[int], labels: list[int], images: list[Any], where: Any,
               videos: list[list[Any]] = ()) -> tuple[list[int], list[int], dict[str, list[int]]]:
        """``ids`` / ``labels`` with each image's and video's placeholder replaced by its expansion (never learned)."""
        image_at, video_at = self._positions(ids, self.placeholder), self._positions(ids, self.video_placeholder)
        self._check_count("image", self.image_text, len(image_at), len(images), where)
        if videos and not self.video_text:
            raise DataError(f"{len(videos)} video(s) but {type(self.processor).__name__}'s family takes no video "
                            "here (video: model=vlm/qwen2_vl or model=vlm/llava_onevision)",
                            source=getattr(where, "source", None), location=getattr(where, "location", None))
        self._check_count("video", self.video_text, len(video_at), len(videos), where)
        media = sorted([(s, len(self.placeholder), lambda im=im: self.expansion(im)) for s, im in zip(image_at, images)]
                       + [(s, len(self.video_placeholder), lambda v=v: self.video_expansion(v))
                          for s, v in zip(video_at, videos)], key=lambda m: m[0])
        out_ids: list[int] = []
        out_labels: list[int] = []
        arrays: dict[str, list[int]] = {}
        at = 0
        for start, width, expand in media:
            expanded, extra = expand()
            text = start - at
            for key in extra:
                arrays.setdefault(key, [0] * len(out_ids))
            for key, values in arrays.items():
                values += [0] * text + extra.get(key, [0] * len(expanded))
            out_ids += ids[at:start] + expanded
            out_labels += labels[at:start] + [IGNORE] * len(expanded)
            at = start + width
        for values in arrays.values():
            values += [0] * (len(ids) - at)
        return out_ids + ids[at:], out_labels + labels[at:], arrays

    @staticmethod
    def _tensors(outputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each output's per-item tensors (not the per-token ones), concatenated along dim 0 (zero-padded)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for out in outputs:
            ids = out["input_ids"]
            for key, value in out.items():
                if key in _TOKEN_KEYS or not isinstance(value, torch.Tensor) or value.shape == ids.shape:
                    continue
                parts.setdefault(key, []).append(value)
        return {key: concat_padded(values) for key, values in parts.items()}

    def image_tensors(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The per-image tensors of ``images``, concatenated along the first dimension (zero-padded)."""
        return self._tensors([self.process(image) for image in images])

    def video_tensors(self, videos: list[list[Any]]) -> dict[str, torch.Tensor]:
        """The per-video tensors (``pixel_values_videos``, ``video_grid_thw``...) of ``videos``, concatenated."""
        return self._tensors([self.process_video(frames) for frames in videos])


def concat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dimensions to the largest."""
    if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
        return torch.cat(tensors)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = tensors[0].new_zeros((sum(t.shape[0] for t in tensors), *shape))
    at = 0
    for t in tensors:
        out[(slice(at, at + t.shape[0]), *(slice(0, s) for s in t.shape[1:]))] = t
        at += t.shape[0]
    return out
