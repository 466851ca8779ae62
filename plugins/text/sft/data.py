"""sft data: instruction / chat records -> chat template -> tokens with an assistant-only loss mask.

Records in any supported format (prompt/completion, OpenAI messages with tool calls,
Alpaca, ShareGPT) become ``messages``, are rendered by the chat template, and only
assistant tokens are learned (``data.train_on=all`` learns everything). With
``data.packing=true`` short examples share rows without seeing each other; the
padding share with and without packing is logged either way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.readers import read_records
from modalforge.data.splits import split_train_val
from modalforge.interfaces import DataModule
from modalforge.plugins.text.chat.formats import Message, split_prompt, to_messages
from modalforge.plugins.text.chat.packing import collate_rows, pack_first_fit
from modalforge.plugins.text.chat.synthetic import write_alignment_sets
from modalforge.plugins.text.chat.tokenize import IGNORE, Tokenized, tokenize_conversation
from modalforge.plugins.text.chat.tokenizer import build_tokenizer

log = logging.getLogger(__name__)


class Rows(Dataset):
    """Rows of one (unpacked) or several (packed) tokenised examples."""

    def __init__(self, rows: list[list[Tokenized]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[Tokenized]:
        return self.rows[index]


def padding_share(lengths: list[int], batch_size: int) -> float:
    """Share of padding tokens when consecutive rows are batched and padded to the longest."""
    padded = real = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i:i + batch_size]
        padded += max(chunk) * len(chunk)
        real += sum(chunk)
    return 1 - real / max(padded, 1)


class SFTDataModule(DataModule):
    """Supervised fine-tuning data.

    Args:
        train / val: files, globs, shards or ``hf:`` datasets; ``None`` generates the arithmetic demo set.
        format: force a record format (``prompt_completion``, ``messages``, ``alpaca``, ``sharegpt``); ``None`` detects.
        chat_template: ``auto`` (the tokenizer's own, else chatml), ``tokenizer``, ``chatml`` or ``llama3``.
        train_on: ``assistant`` (completion-only loss) or ``all``.
        max_length: tokens per example (and per packed row).
        too_long: ``error`` (default, names file and line), ``truncate`` or ``drop`` (counted and reported).
        packing: pack examples into rows of ``max_length``.
        tokenizer / vocab_size: tokenizer to load, or size of the BPE trained on the data when ``None``.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None, format: str | None = None, chat_template: str = "auto",
                 train_on: str = "assistant", max_length: int = 256, too_long: str = "error", packing: bool = True,
                 tokenizer: str | None = None, vocab_size: int = 512, batch_size: int = 16, num_workers: int = 0,
                 val_fraction: float = 0.05, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if train_on not in ("assistant", "all"):
            raise DataError(f"data.train_on={train_on!r} is not one of: assistant, all")
        if too_long not in ("error", "truncate", "drop"):
            raise DataError(f"data.too_long={too_long!r} is not one of: error, truncate, drop")
        self.train_spec, self.val_spec, self.format = train, val, format
        self.chat_template, self.train_on, self.max_length = chat_template, train_on, max_length
        self.too_long, self.packing = too_long, packing
        self.tokenizer_name, self.vocab_size = tokenizer, vocab_size
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        self.cache_dir, self.seed = cache_dir, seed
        self.train_set: Rows | None = None
        self.val_set: Rows | None = None
        self.val_prompts: list[list[Message]] = []
        self.stats: dict[str, float] = {}

    def _synthetic(self) -> Path:
        return ensure_built(cache_root(self.cache_dir) / "synthetic" / "alignment-v1", write_alignment_sets)

    def prepare_data(self) -> None:
        if self.train_spec is None:
            self._synthetic()

    def _conversations(self, spec: Any, what: str) -> list[tuple[list[Message], str]]:
        out = [(to_messages(r, self.format), r.where()) for r in read_records(spec, what=what)]
        if not out:
            raise DataError(f"{what}: no records in {spec!r}")
        return out

    def _tokenize(self, conversations: list[tuple[list[Message], str]], what: str) -> list[Tokenized]:
        examples, dropped = [], []
        for messages, where in conversations:
            example = tokenize_conversation(self.processor, messages, train_on=self.train_on)
            if len(example) > self.max_length:
                if self.too_long == "error":
                    raise DataError(f"example of {len(example)} tokens is longer than data.max_length="
                                    f"{self.max_length}; raise it, or set data.too_long=truncate|drop", source=where)
                if self.too_long == "drop":
                    dropped.append(where)
                    continue
                example = Tokenized(example.input_ids[: self.max_length], example.labels[: self.max_length])
            if all(label == IGNORE for label in example.labels[1:]):
                dropped.append(where)
                continue
            examples.append(example)
        if dropped:
            log.warning("%s: %d example(s) dropped (too long, or nothing left to learn), first: %s", what,
                        len(dropped), dropped[0])
        if not examples:
            raise DataError(f"{what}: no example left to train on")
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.train_spec is None:
            folder = self._synthetic()
            train = self._conversations(str(folder / "sft_train.jsonl"), "data.train")
            val = self._conversations(str(folder / "sft_val.jsonl"), "data.val")
        else:
            train = self._conversations(self.train_spec, "data.train")
            if self.val_spec is not None:
                val = self._conversations(self.val_spec, "data.val")
            else:
                train, val = split_train_val(train, val_fraction=self.val_fraction, seed=self.seed)
        self.processor = build_tokenizer(self.tokenizer_name, self.chat_template, [m for m, _ in train],
                                         self.vocab_size, self.cache_dir)
        train_examples = self._tokenize(train, "data.train")
        val_examples = self._tokenize(val, "data.val")
        packed_rows = pack_first_fit(train_examples, self.max_length)
        self.stats = {
            "padding_share_unpacked": padding_share([len(e) for e in train_examples], self.batch_size),
            "padding_share_packed": padding_share([sum(len(e) for e in r) for r in packed_rows], self.batch_size),
        }
        log.info("sft: %d examples -> %d packed rows; padding share %.1f%% packed vs %.1f%% unpacked",
                 len(train_examples), len(packed_rows), 100 * self.stats["padding_share_packed"],
                 100 * self.stats["padding_share_unpacked"])
        self.train_set = Rows(packed_rows if self.packing else [[e] for e in train_examples])
        self.val_set = Rows(pack_first_fit(val_examples, self.max_length) if self.packing
                            else [[e] for e in val_examples])
        self.val_prompts = [split_prompt(m)[0] for m, _ in val]

    def _collate(self, rows: list[list[Tokenized]]) -> dict[str, torch.Tensor]:
        return collate_rows(rows, self.processor.pad_token_id, self.packing)

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.train_set, self.batch_size, shuffle=True, seed=self.seed,
                                   collate_fn=self._collate, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.val_set, self.batch_size, shuffle=False, collate_fn=self._collate,
                                   num_workers=self.num_workers)

    def model_hints(self) -> dict[str, Any]:
        t = self.processor
        return {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id}

    def sample_inputs(self, n: int) -> list[list[Message]]:
        return self.val_prompts[:n]
