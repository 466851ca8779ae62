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

Hand-written: transformers' processors expand text strings, not token ids with a loss mask.
"""

from __future__ import annotations

from typing import Any

import torch

from modalforge.data.errors import DataError
from modalforge.text.tokenize import IGNORE

_TOKEN_KEYS = ("input_ids", "attention_mask")


class ProcessorImages:
    """Expansions and tensors of images, from an HF processor of any image-text-to-text family."""

    def __init__(self, processor: Any, image_text: str, settings: dict[str, Any] | None = None) -> None:
        self.processor, self.image_text, self.settings = processor, image_text, dict(settings or {})
        self.placeholder: list[int] = processor.tokenizer(image_text, add_special_tokens=False)["input_ids"]
        if not self.placeholder:
            raise DataError(f"the image text {image_text!r} tokenises to nothing")
        self._expansions: dict[tuple[int, int], tuple[list[int], dict[str, list[int]]]] = {}

    def process(self, image: Any) -> dict[str, torch.Tensor]:
        """The processor's outputs for one image on its own."""
        out = self.processor(text=[self.image_text], images=[image], return_tensors="pt", add_special_tokens=False,
                             **self.settings)
        return dict(out)

    def expansion(self, image: Any) -> tuple[list[int], dict[str, list[int]]]:
        """Token ids of one image (and its per-token arrays); one processor call per image size."""
        key = tuple(image.size)
        if key not in self._expansions:
            out = self.process(image)
            ids = out["input_ids"]
            arrays = {k: v[0].tolist() for k, v in out.items()
                      if k not in _TOKEN_KEYS and isinstance(v, torch.Tensor) and v.shape == ids.shape}
            self._expansions[key] = (ids[0].tolist(), arrays)
        return self._expansions[key]

    def _positions(self, ids: list[int]) -> list[int]:
        width, found, at = len(self.placeholder), [], 0
        while at <= len(ids) - width:
            if ids[at:at + width] == self.placeholder:
                found.append(at)
                at += width
            else:
                at += 1
        return found

    def splice(self, ids: list[int], labels: list[int], images: list[Any],
               where: Any) -> tuple[list[int], list[int], dict[str, list[int]]]:
        """``ids`` / ``labels`` with each image's placeholder replaced by its expansion (never learned)."""
        starts = self._positions(ids)
        if len(starts) != len(images):
            raise DataError(f"{len(starts)} image placeholder(s) {self.image_text!r} after tokenisation but "
                            f"{len(images)} image(s): the chat template or tokenizer changed the placeholder",
                            source=getattr(where, "source", None), location=getattr(where, "location", None))
        out_ids: list[int] = []
        out_labels: list[int] = []
        arrays: dict[str, list[int]] = {}
        at = 0
        for start, image in zip(starts, images):
            expanded, extra = self.expansion(image)
            text = start - at
            for key in extra:
                arrays.setdefault(key, [0] * len(out_ids))
            for key, values in arrays.items():
                values += [0] * text + extra.get(key, [0] * len(expanded))
            out_ids += ids[at:start] + expanded
            out_labels += labels[at:start] + [IGNORE] * len(expanded)
            at = start + len(self.placeholder)
        for values in arrays.values():
            values += [0] * (len(ids) - at)
        return out_ids + ids[at:], out_labels + labels[at:], arrays

    def image_tensors(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The per-image tensors of ``images``, concatenated along the first dimension (zero-padded)."""
        if not images:
            return {}
        parts: dict[str, list[torch.Tensor]] = {}
        for image in images:
            out = self.process(image)
            ids = out["input_ids"]
            for key, value in out.items():
                if key in _TOKEN_KEYS or not isinstance(value, torch.Tensor) or value.shape == ids.shape:
                    continue
                parts.setdefault(key, []).append(value)
        return {key: concat_padded(values) for key, values in parts.items()}


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
