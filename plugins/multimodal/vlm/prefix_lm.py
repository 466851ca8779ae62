"""Prefix-LM families (PaliGemma): one prompt (the prefix) and one answer (the suffix), not a chat.

PaliGemma reads ``<image>`` x N, BOS, the prefix and ``\\n``, then learns the suffix and EOS; its
``token_type_ids`` mark the prefix (0), over which attention is bidirectional, and the suffix (1).
``PaliGemmaProcessor(text=..., images=..., suffix=...)`` builds exactly that, labels included, so the
whole example comes from the processor: a chat record must be one user turn and one assistant answer
(its images in the user turn), a caption record is PaliGemma's own ``caption en`` task. Anything else
(several turns, a system prompt, documents, video) is an error naming the record.
"""

from __future__ import annotations

from typing import Any

import torch

from modalforge.plugins.multimodal.vlm.formats import Sample

CAPTION_PREFIX = "caption en"  # PaliGemma's captioning task prompt


def prefix_and_suffix(sample: Sample, image_token: str) -> tuple[str, str]:
    """The record as PaliGemma's (prefix, suffix), placeholders removed (its images go before the prefix)."""
    if sample.videos:
        raise sample.error("PaliGemma takes images only, not video")
    if sample.caption is not None:
        return CAPTION_PREFIX, sample.caption
    if not sample.is_chat:
        raise sample.error("PaliGemma trains a prefix -> suffix pair (a question and its answer, or a caption), "
                           "not an interleaved document")
    roles = [m["role"] for m in sample.messages]
    if roles != ["user", "assistant"]:
        raise sample.error(f"PaliGemma trains one prompt and one answer (user, assistant), not the turns {roles}: "
                           "split the conversation into one record per exchange")
    prompt, answer = (str(m.get("content") or "") for m in sample.messages)
    return prompt.replace(image_token, "").strip(), answer.strip()


def prefix_text(prefix: str, images: int, image_text: str) -> str:
    """What the processor expects: one image placeholder per image at the start, then the prefix."""
    return image_text * images + prefix


def prefix_lm_example(processor: Any, images: list[Any], prefix: str, suffix: str | None,
                      image_text: str) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """(ids, labels, per-token arrays) as the processor builds them; ``suffix=None``: a prompt for generation."""
    kwargs: dict[str, Any] = {"suffix": [suffix]} if suffix is not None else {}
    out = processor(text=[prefix_text(prefix, len(images), image_text)], images=[images] if images else None,
                    return_tensors="pt", **kwargs)
    ids = out["input_ids"][0].tolist()
    labels = out["labels"][0].tolist() if "labels" in out else [-100] * len(ids)
    arrays = {k: v[0].tolist() for k, v in out.items() if k in ("token_type_ids",) and isinstance(v, torch.Tensor)}
    return ids, labels, arrays

