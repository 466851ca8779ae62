"""Streaming packed blocks from webdataset shards, for corpora too large to tokenise up front.

Each DDP rank and dataloader worker reads its own shards (``webdataset_stream``
splits by node and worker), tokenises documents as they come and cuts the token
stream into ``block_size`` rows, so memory stays flat however large the corpus.
A resumed streaming run restarts its shards from the beginning: exact data
position is only kept for map-style data (``data.streaming=false``).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset

from modalforge.data.readers import require_fields
from modalforge.data.shards import webdataset_stream


class PackedShardStream(IterableDataset):
    """``{"input_ids": LongTensor[block_size]}`` rows packed from the text of streamed shard samples.

    Args:
        urls: shard paths, globs or brace ranges.
        tokenizer: a Hugging Face tokenizer.
        block_size: tokens per row.
        text_field: shard key holding the text (``txt``, ``text``...).
        shuffle: webdataset shuffle buffer (0: off).
        seed: shuffling seed.
    """

    def __init__(self, urls: Any, tokenizer: Any, block_size: int, text_field: str = "txt", shuffle: int = 0,
                 seed: int = 0) -> None:
        super().__init__()
        self.urls, self.tokenizer, self.block_size = urls, tokenizer, block_size
        self.text_field, self.shuffle, self.seed = text_field, shuffle, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer: list[int] = []
        eos = self.tokenizer.eos_token_id
        for record in webdataset_stream(self.urls, shuffle=self.shuffle, seed=self.seed):
            require_fields(record, {self.text_field: str})
            buffer.extend(self.tokenizer(record.data[self.text_field], add_special_tokens=False)["input_ids"])
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= self.block_size:
                block, buffer = buffer[: self.block_size], buffer[self.block_size:]
                yield {"input_ids": torch.tensor(block, dtype=torch.long)}
