"""sft data: instruction / chat records -> chat template -> tokens with an assistant-only loss mask.

Records in any supported format (prompt/completion, OpenAI messages with tool calls,
Alpaca, ShareGPT) become ``messages``, are rendered by the chat template, and only
assistant tokens are learned (``data.train_on=all`` learns everything). With
``data.packing=true`` short examples share rows without seeing each other; the
padding share with and without packing is logged either way.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.workers import Workers
from modalforge.data.readers import Record
from modalforge.plugins.text.chat.formats import Message, fold_system, record_tools, split_prompt, to_messages
from modalforge.plugins.text.chat.packing import collate_rows, pack_first_fit
from modalforge.plugins.text.chat.synthetic import write_alignment_sets
from modalforge.plugins.text.chat.tokenize import IGNORE, Tokenized, tokenize_conversation
from modalforge.plugins.text.chat.tokenizer import build_tokenizer

log = logging.getLogger(__name__)
#: One parsed record: its messages, where it was read (file, line) and its ``tools`` for the template.
Item = tuple[list[Message], str, list[dict[str, Any]] | None]


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


class SFTDataModule(SourcedDataModule):
    """Supervised fine-tuning data.

    Args:
        train / val: sources as every plugin takes them (files, globs, shards, ``hf:``, a weighted
            mixture, named validation sets); ``None`` generates the arithmetic demo set.
        format: force a record format (``prompt_completion``, ``messages``, ``alpaca``, ``sharegpt``); ``None`` detects.
        chat_template: ``auto`` (the tokenizer's own, else chatml), ``tokenizer``, ``chatml``, ``llama3``, or a
            ``.jinja`` file.
        system_prompt: ``keep`` (as the template renders it) or ``fold`` (into the first user turn, for templates
            without a system role).
        train_on: ``assistant`` (completion-only loss) or ``all``.
        max_length: tokens per example (and per packed row).
        too_long: ``error`` (default, names file and line), ``truncate`` or ``drop`` (counted and reported).
        packing: pack examples into rows of ``max_length``.
        packing_attention: how packed examples are kept apart: ``position_ids`` (no mask: position ids
            restart per example, so flash-attention varlen kernels, sdpa and eager all separate them)
            or ``dense`` (a block-diagonal L x L boolean mask per row; exact with sdpa only).
        tokenizer / vocab_size: tokenizer to load, or size of the BPE trained on the data when ``None``.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None,
                 format: Literal["prompt_completion", "messages", "alpaca", "sharegpt"] | None = None,
                 chat_template: str = "auto", system_prompt: Literal["keep", "fold"] = "keep",
                 train_on: Literal["assistant", "all"] = "assistant",
                 max_length: int = 256, too_long: Literal["error", "truncate", "drop"] = "error",
                 packing: bool = True, packing_attention: Literal["position_ids", "dense"] = "position_ids",
                 tokenizer: str | None = None, vocab_size: int = 512, batch_size: int = 16,
                 num_workers: Workers = "auto", val_fraction: float = 0.05, cache_dir: str | None = None,
                 seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        if train_on not in ("assistant", "all"):
            raise DataError(f"data.train_on={train_on!r} is not one of: assistant, all")
        if system_prompt not in ("keep", "fold"):
            raise DataError(f"data.system_prompt={system_prompt!r} is not one of: keep, fold")
        if too_long not in ("error", "truncate", "drop"):
            raise DataError(f"data.too_long={too_long!r} is not one of: error, truncate, drop")
        self.format, self.chat_template, self.train_on, self.max_length = format, chat_template, train_on, max_length
        self.too_long, self.packing, self.packing_attention = too_long, packing, packing_attention
        self.tokenizer_name, self.vocab_size, self.system_prompt = tokenizer, vocab_size, system_prompt
        self.stats: dict[str, float] = {}

    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "alignment-v1", write_alignment_sets)
        return str(folder / "sft_train.jsonl"), str(folder / "sft_val.jsonl")

    def parse(self, record: Record) -> Item:
        messages = to_messages(record, self.format)
        if self.system_prompt == "fold":
            messages = fold_system(messages)
        return messages, record.where(), record_tools(record)

    def fit(self, train_items: list[Item]) -> None:
        self.processor = build_tokenizer(self.tokenizer_name, self.chat_template, [m for m, *_ in train_items],
                                         self.vocab_size, self.cache_dir)

    def _tokenize(self, conversations: list[Item], what: str) -> list[Tokenized]:
        examples, dropped = [], []
        for messages, where, tools in conversations:
            example = tokenize_conversation(self.processor, messages, train_on=self.train_on, tools=tools,
                                            where=where)
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

    def build(self, items: list[Item], what: str) -> Rows:
        examples = self._tokenize(items, what)
        packed = pack_first_fit(examples, self.max_length)
        if what.startswith("data.train"):
            self.stats = {
                "padding_share_unpacked": padding_share([len(e) for e in examples], self.batch_size),
                "padding_share_packed": padding_share([sum(len(e) for e in r) for r in packed], self.batch_size),
            }
            log.info("sft %s: %d examples -> %d packed rows; padding share %.1f%% packed vs %.1f%% unpacked", what,
                     len(examples), len(packed), 100 * self.stats["padding_share_packed"],
                     100 * self.stats["padding_share_unpacked"])
        return Rows(packed if self.packing else [[e] for e in examples])

    def collate(self, rows: list[list[Tokenized]]) -> dict[str, torch.Tensor]:
        return collate_rows(rows, self.processor.pad_token_id, self.packing, attention=self.packing_attention)

    _collate = collate

    def model_hints(self) -> dict[str, Any]:
        t = self.processor
        return {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id}

    def sample_inputs(self, n: int) -> list[list[Message]]:
        return [split_prompt(m)[0] for m, *_ in self.first_val_items()[:n]]
