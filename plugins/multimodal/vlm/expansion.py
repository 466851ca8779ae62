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

    def process(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The processor's outputs for one sample's images, as one prompt (placeholders apart by :attr:`separator`).

        One call per sample, not per image: LLaVA-OneVision gives a prompt of several images no any-res
        patches (fewer tokens, other pixels) and its model reads ``batch_num_images`` to know.
        """
        text = self.separator_text.join([self.image_text] * len(images))
        out = self.processor(text=[text], images=[list(images)], return_tensors="pt", add_special_tokens=False,
                             **self.settings)
        return dict(out)

    @property
    def separator_text(self) -> str:
        """A special token between one sample's placeholders, where its expansion is cut into images."""
        tok = self.processor.tokenizer
        return tok.eos_token or tok.pad_token

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

    def expansions(self, images: list[Any]) -> list[tuple[list[int], dict[str, list[int]]]]:
        """Token ids (and per-token arrays) of each of one sample's images; one processor call per list of sizes."""
        if not images:
            return []
        ids, arrays = self._expansion(("images", *(image.size for image in images)), lambda: self.process(images))
        separator = self.processor.tokenizer.convert_tokens_to_ids(self.separator_text)
        cuts = [i for i, token in enumerate(ids) if token == separator]
        if len(cuts) != len(images) - 1:
            raise DataError(f"{type(self.processor).__name__} expanded {len(images)} images with "
                            f"{len(cuts) + 1} piece(s) between separators {self.separator_text!r}")
        bounds = list(zip([0] + [c + 1 for c in cuts], cuts + [len(ids)]))
        return [(ids[a:b], {k: v[a:b] for k, v in arrays.items()}) for a, b in bounds]

    def video_expansion(self, frames: list[Any]) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids of one video; one processor call per frame count and frame size."""
        return self._expansion(("video", len(frames), *frames[0].size), lambda: self.process_video(frames))

    def media_token_ids(self) -> set[int]:
        """Every id of the image and video expansions made so far (what is never text)."""
        separator = self.processor.tokenizer.convert_tokens_to_ids(self.separator_text)
        return {token for ids, _ in self._expansions.values() for token in ids} - {separator}

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
        media = sorted([*((s, len(self.placeholder), e) for s, e in zip(image_at, self.expansions(images))),
                        *((s, len(self.video_placeholder), self.video_expansion(v)) for s, v in zip(video_at, videos))],
                       key=lambda m: m[0])
        out_ids: list[int] = []
        out_labels: list[int] = []
        arrays: dict[str, list[int]] = {}
        at = 0
        for start, width, (expanded, extra) in media:
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

    def image_tensors(self, groups: list[list[Any]]) -> dict[str, torch.Tensor]:
        """The per-image tensors of each sample's images (``groups``), concatenated along dim 0 (zero-padded)."""
        return self._tensors([self.process(images) for images in groups if images])

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
