"""causal_lm data: raw text -> tokens -> fixed-length blocks, no padding.

Documents are tokenised, each followed by EOS, concatenated, and cut into
``block_size`` token rows (the GPT-2 / nanoGPT recipe). A document longer than a
block simply continues in the next row; the tail shorter than one block is dropped
and its size reported. Nothing is padded, so every token trains.

Empty values / truncated media / duplicates / mixed types: a blank document (``""``, whitespace,
an empty ``.txt`` file) is skipped, counted in one warning per source (web corpora hold many; each
would train a lone EOS); a missing or ``null`` text is an error naming file and line. A repeated
document is kept and counted (deduplicate upstream). A text field that is not a string (a number,
a list) is an error, never ``str()``'d. No media.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.duplicates import report_repeats
from modalforge.data.workers import Workers
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.mixture import MixedStream
from modalforge.data.readers import Record, read_records, require_fields
from modalforge.data.tokenizers import cached_bpe, load_tokenizer
from modalforge.progress import preparing
from modalforge.text.token_cache import cache_folder, cached, code_digest, items_digest, tokenizer_digest
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


class CausalLMDataModule(SourcedDataModule):
    """Reads text, trains or loads a tokenizer, and serves packed blocks.

    Args:
        train: training files/globs/dirs/shards, ``hf:<dataset>``, or a weighted mixture of sources;
            ``None`` uses the synthetic corpus.
        val: validation data (one set or named sets); ``None`` splits ``val_fraction`` off ``train``.
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
        token_cache: where the tokenised blocks are kept so that a second start skips tokenising: ``auto``
            (``<cache_dir>/tokenized``), ``off``, or a folder (:mod:`modalforge.text.token_cache`).
        seed: shuffling seed.
    """

    def __init__(self, train: Any = None, val: Any = None, val_fraction: float = 0.05, text_field: str = "text",
                 txt_mode: Literal["file", "line"] = "file", block_size: int = 128, batch_size: int = 8,
                 num_workers: Workers = "auto", tokenizer: str | None = None, vocab_size: int = 512,
                 cache_dir: str | None = None, seed: int = 0, streaming: bool = False,
                 shuffle_buffer: int = 1000, token_cache: str | bool = "auto") -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        if block_size < 2:
            raise DataError(f"data.block_size={block_size}: a block needs at least 2 tokens")
        self.text_field, self.txt_mode = text_field, txt_mode
        self.block_size = block_size
        self.tokenizer_name, self.vocab_size = tokenizer, vocab_size
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer
        self.token_cache = token_cache
        self.token_cache_entries: dict[str, Any] = {}  # what -> (entry folder or None, read from it?, examples)
        if streaming and (train is None or val is None):
            raise DataError("data.streaming=true needs data.train (shards) and data.val: a stream cannot be split")

    # ---- reading ----------------------------------------------------------------------
    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "causal_lm-v1", write_corpus)
        return str(folder / "train.jsonl"), str(folder / "val.jsonl")

    def read(self, spec: Any, what: str) -> list[str]:
        texts, wheres, blank = [], [], []
        for record in read_records(spec, what=what, txt_mode=self.txt_mode, text_field=self.text_field):
            text = self.parse(record)
            if text.strip():
                texts.append(text)
                wheres.append(record.where())
            else:
                blank.append(record.where())
        if blank:
            log.warning("%s: %d blank document(s) skipped (first: %s)", what, len(blank), blank[0])
        if not texts:
            raise DataError(f"{what}: no documents found in {spec!r}" + (" (every one is blank)" if blank else ""))
        report_repeats(zip(texts, wheres), what=what, kind="document", note="deduplicate upstream if unwanted")
        return texts

    def parse(self, record: Record) -> str:
        require_fields(record, {self.text_field: str})
        return record.data[self.text_field]

    def fit(self, train_items: list[str]) -> None:
        if self.tokenizer_name:
            self.processor = load_tokenizer(self.tokenizer_name)
        else:
            self.processor = cached_bpe(train_items, self.vocab_size, cache_dir=self.cache_dir)

    def build(self, items: list[str], what: str) -> BlockDataset:
        return self._blocks(items, what)

    # ---- setup ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.streaming:
            self._setup_streaming()
            return
        super().setup(stage)

    def _setup_streaming(self) -> None:
        name, spec = next(iter(self.val_specs.items()))
        val_texts = self.read(spec, "data.val")
        # A stream is never read whole, so a trained BPE learns from the validation documents.
        self.fit(val_texts)
        streams = [PackedShardStream(source.spec, self.processor, self.block_size, self.text_field,
                                     shuffle=self.shuffle_buffer, seed=self.seed) for source in self.sources]
        self.train_set = streams[0] if len(streams) == 1 else MixedStream(
            streams, [s.weight for s in self.sources], [s.name for s in self.sources], seed=self.seed)
        self.val_sets = {name: self._blocks(val_texts, "data.val")}
        self.val_items = {name: val_texts}

    def _blocks(self, texts: list[str], what: str) -> BlockDataset:
        key = {"items": items_digest(texts), "tokenizer": tokenizer_digest(self.processor),
               "options": {"block_size": self.block_size}, "code": code_digest(__name__)}
        (arrays, meta), hit, entry = cached(f"causal_lm-{what}", cache_folder(self.token_cache, self.cache_dir), key,
                                            lambda: self._tokenize_blocks(texts, what))
        self.token_cache_entries[what] = (entry, hit, int(arrays["blocks"].shape[0]))
        if hit:
            log.info("%s: %s, read from the token cache %s", what, meta["summary"], entry)
        return BlockDataset(torch.from_numpy(np.array(arrays["blocks"], dtype=np.int64)))

    def _tokenize_blocks(self, texts: list[str], what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tokenizer = self.processor
        ids: list[list[int]] = []
        with preparing(f"{what}: tokenising", total=len(texts), unit="document") as progress:
            for start in range(0, len(texts), 1000):  # in chunks, for the bar: the same ids as one call
                chunk = texts[start:start + 1000]
                ids += tokenizer(chunk, add_special_tokens=False)["input_ids"]
                progress.update(len(chunk))
            long_docs = sum(len(x) > self.block_size for x in ids)
            blocks, dropped = pack_blocks(ids, self.block_size, tokenizer.eos_token_id)
            if blocks.shape[0] == 0:
                total = sum(len(x) for x in ids)
                raise DataError(f"{what}: {len(texts)} documents give {total} tokens, fewer than one block of "
                                f"data.block_size={self.block_size}; add data or lower data.block_size")
            progress.summary = (f"{len(texts)} documents -> {blocks.shape[0]} blocks of {self.block_size} tokens "
                                f"({long_docs} documents span several blocks, {dropped} tail tokens dropped)")
        small = blocks.numel() == 0 or int(blocks.max()) <= np.iinfo(np.int32).max
        return ({"blocks": blocks.numpy().astype(np.int32 if small else np.int64)},
                {"examples": int(blocks.shape[0]), "summary": progress.summary})

    # ---- loaders ----------------------------------------------------------------------
    def train_dataloader(self) -> ResumableDataLoader | DataLoader:
        self.setup()
        if self.streaming:
            return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers)
        return super().train_dataloader()

    # ---- for the objective ------------------------------------------------------------
    @property
    def val_texts(self) -> list[str]:
        return self.first_val_items()

    def model_hints(self) -> dict[str, Any]:
        tokenizer = self.processor
        return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}

    def sample_inputs(self, n: int) -> list[str]:
        """Prompts for samples: the first four words of a few validation documents."""
        return [" ".join(text.split()[:4]) for text in self.val_texts[:n]]
