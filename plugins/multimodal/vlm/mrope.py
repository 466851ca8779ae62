"""Exact packed rows for multimodal RoPE (Qwen2-VL family): 3-D positions that restart per sample.

A Qwen2-VL model computes its (temporal, height, width) positions over a whole row, so two samples
packed into one row would get one long position run and the second sample's images wrong positions.
Here each packed sample gets the model's own ``get_rope_index`` positions, computed on that sample
alone, and the row's text positions go in front: transformers' Qwen2-VL reads a ``(4, B, L)`` tensor as
text positions (for the packed attention boundaries) plus the three M-RoPE rows.

Hand-written: transformers computes M-RoPE only per unpacked row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    starts = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    return list(zip(starts[:-1], starts[1:]))


def _image_runs(types: torch.Tensor) -> int:
    """Images (runs of non-text tokens) in one sample's token types."""
    if types.numel() == 0:
        return 0
    changes = torch.diff(types, prepend=types.new_zeros(1))
    return int(((changes != 0) & (types != 0)).sum())


def packed_mrope_positions(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``(4, B, L)`` positions for packed rows; ``inputs["position_ids"]`` unchanged if the model has no M-RoPE."""
    inner = getattr(model, "model", model)
    positions = inputs["position_ids"]
    if not hasattr(inner, "get_rope_index") or positions.dim() != 2:
        return positions
    out = positions[None].expand(4, -1, -1).clone()  # text-only samples: the same 1-D positions on every row
    grids = inputs.get("image_grid_thw")
    videos = inputs.get("video_grid_thw")
    image_at = video_at = 0
    for row in range(positions.shape[0]):
        for start, end in _segments(positions[row]):
            types = inputs["mm_token_type_ids"][row, start:end]
            images, clips = _image_runs((types == 1).long()), _image_runs((types == 2).long())
            if not images and not clips:
                continue
            rope, _ = inner.get_rope_index(
                inputs["input_ids"][row:row + 1, start:end], mm_token_type_ids=types[None],
                image_grid_thw=grids[image_at:image_at + images] if images else None,
                video_grid_thw=videos[video_at:video_at + clips] if clips else None)
            out[1:, row, start:end] = rope[:, 0]
            image_at, video_at = image_at + images, video_at + clips
    return out
