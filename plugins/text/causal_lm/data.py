"""causal_lm data: raw text -> tokens -> fixed-length blocks, no padding.

Documents are tokenised, each followed by EOS, concatenated, and cut into
``block_size`` token rows (the GPT-2 / nanoGPT recipe). A document longer than a
block simply continues in the next row; the tail shorter than one block is dropped
and its size reported. Nothing is padded, so every token trains.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.readers import Record, read_records, require_fields
from modalforge.data.splits import split_train_val
from modalforge.data.tokenizers import cached_bpe, load_tokenizer
from modalforge.interfaces import DataModule
from modalforge.plugins.text.causal_lm.streaming import PackedShardStream
from modalforge.plugins.text.causal_lm.synthetic import write_corpus

log = logging.getLogger(__name__)


class BlockDataset(Dataset):
    """Rows of a ``[num_blocks, block_size]`` token tensor, as ``{"input_ids": ...}``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


def pack_blocks(token_lists: list[list[int]], block_size: int, eos_id: int | None) -> tuple[torch.Tensor, int]:
    """Concatenate documents (EOS after each) and cut into rows; returns (blocks, dropped tail tokens)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    num_blocks = len(stream) // block_size
    blocks = torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)
    return blocks, len(stream) - num_blocks * block_size


class CausalLMDataModule(DataModule):
    """Reads text, trains or loads a tokenizer, and serves packed blocks.

    Args:
        train: training files/globs/dirs/shards, or ``hf:<dataset>``; ``None`` uses the synthetic corpus.
        val: validation data; ``None`` splits ``val_fraction`` off ``train``.
        val_fraction: share of training documents held out when ``val`` is not given.
        text_field: the field holding text in jsonl/parquet/csv records and shard samples.
        txt_mode: ``.txt`` files as one document per ``file`` or per ``line``.
        block_size: tokens per training row.
        batch_size: rows per batch (per device).
        num_workers: dataloader worker processes.
        tokenizer: tokenizer name or folder; ``None`` trains a byte-level BPE on the training text.
        vocab_size: size of that BPE.
        streaming: stream webdataset shards instead of reading them up front (needs ``val``; a BPE
            is then trained on the validation documents).
        shuffle_buffer: streaming shuffle buffer size.
        cache_dir: where the synthetic corpus and trained tokenizers are kept.
        seed: shuffling seed.
    """

    def __init__(self, train: Any = None, val: Any = None, val_fraction: float = 0.05, text_field: str = "text",
                 txt_mode: str = "file", block_size: int = 128, batch_size: int = 8, num_workers: int = 0,
                 tokenizer: str | None = None, vocab_size: int = 512, cache_dir: str | None = None,
                 seed: int = 0, streaming: bool = False, shuffle_buffer: int = 1000) -> None:
        super().__init__()
        if block_size < 2:
            raise DataError(f"data.block_size={block_size}: a block needs at least 2 tokens")
        self.train_spec, self.val_spec = train, val
        self.val_fraction, self.text_field, self.txt_mode = val_fraction, text_field, txt_mode
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.tokenizer_name, self.vocab_size = tokenizer, vocab_size
        self.cache_dir, self.seed = cache_dir, seed
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer
        if streaming and (train is None or val is None):
            raise DataError("data.streaming=true needs data.train (shards) and data.val: a stream cannot be split")
        self.train_set: BlockDataset | PackedShardStream | None = None
        self.val_set: BlockDataset | None = None
        self.val_texts: list[str] = []

    # ---- reading ----------------------------------------------------------------------
    def _synthetic_folder(self) -> Path:
        return ensure_built(cache_root(self.cache_dir) / "synthetic" / "causal_lm-v1", write_corpus)

    def prepare_data(self) -> None:
        if self.train_spec is None:
            self._synthetic_folder()

    def _texts(self, spec: Any, what: str) -> list[str]:
        texts = []
        for record in read_records(spec, what=what, txt_mode=self.txt_mode, text_field=self.text_field):
            texts.append(self._text_of(record))
        if not texts:
            raise DataError(f"{what}: no documents found in {spec!r}")
        return texts

    def _text_of(self, record: Record) -> str:
        require_fields(record, {self.text_field: str})
        return record.data[self.text_field]

    # ---- setup ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.streaming:
            self._setup_streaming()
            return
        if self.train_spec is None:
            folder = self._synthetic_folder()
            train_texts = self._texts(str(folder / "train.jsonl"), "data.train")
            val_texts = self._texts(str(folder / "val.jsonl"), "data.val")
        else:
            train_texts = self._texts(self.train_spec, "data.train")
            if self.val_spec is not None:
                val_texts = self._texts(self.val_spec, "data.val")
            else:
                train_texts, val_texts = split_train_val(train_texts, val_fraction=self.val_fraction, seed=self.seed)
        if self.tokenizer_name:
            self.processor = load_tokenizer(self.tokenizer_name)
        else:
            self.processor = cached_bpe(train_texts, self.vocab_size, cache_dir=self.cache_dir)
        self.train_set = self._blocks(train_texts, "data.train")
        self.val_set = self._blocks(val_texts, "data.val")
        self.val_texts = val_texts

    def _setup_streaming(self) -> None:
        val_texts = self._texts(self.val_spec, "data.val")
        # A stream is never read whole, so a trained BPE learns from the validation documents.
        self.processor = (load_tokenizer(self.tokenizer_name) if self.tokenizer_name
                          else cached_bpe(val_texts, self.vocab_size, cache_dir=self.cache_dir))
        self.train_set = PackedShardStream(self.train_spec, self.processor, self.block_size, self.text_field,
                                           shuffle=self.shuffle_buffer, seed=self.seed)
        self.val_set = self._blocks(val_texts, "data.val")
        self.val_texts = val_texts

    def _blocks(self, texts: list[str], what: str) -> BlockDataset:
        tokenizer = self.processor
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        long_docs = sum(len(x) > self.block_size for x in ids)
        blocks, dropped = pack_blocks(ids, self.block_size, tokenizer.eos_token_id)
        if blocks.shape[0] == 0:
            total = sum(len(x) for x in ids)
            raise DataError(f"{what}: {len(texts)} documents give {total} tokens, fewer than one block of "
                            f"data.block_size={self.block_size}; add data or lower data.block_size")
        log.info("%s: %d documents -> %d blocks of %d tokens (%d documents span several blocks, %d tail tokens dropped)",
                 what, len(texts), blocks.shape[0], self.block_size, long_docs, dropped)
        return BlockDataset(blocks)

    # ---- loaders ----------------------------------------------------------------------
    def train_dataloader(self) -> ResumableDataLoader | DataLoader:
        self.setup()
        if self.streaming:
            return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers)
        return ResumableDataLoader(self.train_set, self.batch_size, shuffle=True, seed=self.seed,
                                   num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.val_set, self.batch_size, shuffle=False, num_workers=self.num_workers)

    # ---- for the objective ------------------------------------------------------------
    def model_hints(self) -> dict[str, Any]:
        tokenizer = self.processor
        return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}

    def sample_inputs(self, n: int) -> list[str]:
        """Prompts for samples: the first four words of a few validation documents."""
        return [" ".join(text.split()[:4]) for text in self.val_texts[:n]]
