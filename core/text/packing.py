"""Pack short examples into full rows without cross-contamination.

Examples are placed first-fit into rows of ``max_length`` tokens. Each row carries
``position_ids`` that restart at every example. Two ways keep the examples apart:
``attention="dense"`` (the default) builds a block-diagonal causal mask in the collator;
``attention="position_ids"`` sends no mask and lets transformers (>= 5) derive the
boundaries from the position ids, which costs no L*L tensor in the batch and reaches
flash-attention's varlen kernels and FlexAttention's block masks. Hand-written: transformers'
``DataCollatorWithFlattening`` flattens a batch into one row, which this module's
first-fit rows and padding shares do not need.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from modalforge.text.tokenize import IGNORE, Tokenized


def pack_first_fit(examples: Sequence[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Groups of examples whose total length fits ``max_length`` (longest first, first fit).

    Each example goes into the first (oldest) row with room for it, else opens a row. The row is
    found in a max-tree of the rows' free room, in ``O(log rows)`` rather than by a scan of every
    row (which made packing 50k examples take half a minute); the rows are the scan's."""
    order = sorted(examples, key=len, reverse=True)
    size = 1
    while size < len(order):
        size *= 2
    room = [-1] * (2 * size)  # room[size + r]: free tokens of row r (-1: not opened); inner nodes: max of children
    rows: list[list[Tokenized]] = []
    for example in order:
        need = len(example)
        if room[1] >= need:
            node = 1
            while node < size:  # descend to the leftmost row with room
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            rows[node - size].append(example)
            free = room[node] - need
        else:
            node = size + len(rows)
            rows.append([example])
            free = max_length - need
        room[node] = free
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return rows


def input_token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens of a batch from :func:`collate_rows`, padded or packed (a 0-d tensor, no sync).

    Packed rows hold their examples from the start and padding (position 0) only at the end,
    so a row's tokens run up to its last position above 0 (an example has at least 2 tokens).
    """
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.sum()
    positions = batch.get("position_ids")
    if positions is None:
        return torch.tensor(batch["input_ids"].numel())
    index = torch.arange(1, positions.shape[1] + 1, device=positions.device)
    return (positions.ne(0) * index).amax(dim=1).sum()


def collate_rows(rows: Sequence[Sequence[Tokenized]], pad_id: int, packed: bool,
                 attention: Literal["dense", "position_ids"] = "dense") -> dict[str, torch.Tensor]:
    """Pad rows of one or more examples; ``packed`` adds position ids and the examples' separation.

    Args:
        rows: each row one example (padding) or several (packing).
        pad_id: the padding token.
        packed: rows hold several examples.
        attention: how packed examples are kept apart. ``dense``: a block-diagonal causal
            ``(B, 1, L, L)`` boolean mask (L*L bytes per row: 64 MB at 8k). ``position_ids``: no
            mask at all; the position ids restart at each example and transformers derives the
            sequence boundaries from them: varlen kernels for ``flash_attention_2``, its own packed
            mask for ``sdpa`` (same loss as ``dense``) and ``eager`` (where a boolean 4-D mask is
            not what eager attention expects and ``dense`` is wrong), a block mask for ``flex_attention``.
    """
    length = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    seq = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            end = start + len(example)
            ids[r, start:end] = torch.tensor(example.input_ids)
            labels[r, start:end] = torch.tensor(example.labels)
            positions[r, start:end] = torch.arange(len(example))
            seq[r, start:end] = s
            start = end
    batch = {"input_ids": ids, "labels": labels}
    if packed and attention == "position_ids":
        batch["position_ids"] = positions  # padding: position 0 each, a one-token sequence of its own
    elif packed:
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
        mask = same & causal
        mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
        batch["attention_mask"] = mask[:, None]
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = (seq >= 0).long()
    return batch
