"""Pack short examples into full rows without cross-contamination.

Examples are placed first-fit into rows of ``max_length`` tokens. Each row carries
``position_ids`` that restart at every example and a sequence index per token; the
collator turns that into a block-diagonal causal attention mask so no token attends
to another example. Hand-written: transformers' packing collator
(``DataCollatorWithFlattening``) relies on flash-attention kernels to separate
examples, which CPUs and SDPA do not have.
"""

from __future__ import annotations

from typing import Sequence

import torch

from modalforge.plugins.text.chat.tokenize import IGNORE, Tokenized


def pack_first_fit(examples: Sequence[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Groups of examples whose total length fits ``max_length`` (longest first, first fit)."""
    rows: list[list[Tokenized]] = []
    room: list[int] = []
    for example in sorted(examples, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(example) <= free:
                rows[i].append(example)
                room[i] -= len(example)
                break
        else:
            rows.append([example])
            room.append(max_length - len(example))
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


def collate_rows(rows: Sequence[Sequence[Tokenized]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Pad rows of one or more examples; ``packed`` adds position ids and a block-diagonal 4-D mask."""
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
    if packed:
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        same = (seq[:, :, None] == seq[:, None, :]) & (seq[:, :, None] >= 0)
        mask = same & causal
        mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
        batch["attention_mask"] = mask[:, None]
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = (seq >= 0).long()
    return batch
