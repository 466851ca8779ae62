"""Prompt data for online RL: prompts (a string or ``messages``) plus any fields the rewards read (``answer``...).

A batch is ``batch_size`` prompts, left-padded for ``generate``, with their records. RL
optimises one rollout over several steps (``num_iterations`` x ``steps_per_generation``),
so the sampler yields each prompt batch that many times in a row (``repeat``, set by the
objective when it connects); resuming skips exactly the batches already trained, repeats
included, and the objective's checkpointed buffer says which minibatch comes next.

Empty values / truncated media / duplicates / mixed types: a missing, ``null`` or blank prompt
(a string, or messages that are all blank) is an error naming file and line, as is a number or
a message with an unknown role or non-text content. A prompt may be a string on one line and
messages on the next. A repeated prompt is kept and counted (one warning per source). The other
fields (``answer``...) reach the rewards as read: ``1`` and ``"1"`` stay what they are (the built-in
``exact_match`` compares numerically). No media.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.duplicates import report_repeats
from modalforge.data.errors import DataError
from modalforge.data.loader import ResumableDataLoader, ResumableSampler
from modalforge.data.readers import Record, read_records
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.workers import Workers
from modalforge.progress import preparing
from modalforge.text.formats import Message, check_messages
from modalforge.text.synthetic import OPS
from modalforge.text.tokenize import tokenize_prompt
from modalforge.text.tokenizer import build_tokenizer

SYSTEM = "Answer with a number."
#: operands of the demo's questions are 0..MAX_OPERAND: 75 distinct facts (3 operations), few enough that a
#: 2-layer 64-wide policy meets each one often within the demo's RL steps (with 0..9, 300 facts, RL's
#: per-fact progress is too slow to show in minutes)
MAX_OPERAND = 4


def demo_question(rng: random.Random, max_operand: int = MAX_OPERAND) -> tuple[str, int]:
    """One "What is a <op> b?" question of the demo and its answer."""
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice(list(OPS))
    return f"What is {a} {op} {b}?", OPS[op](a, b)


def write_prompt_sets(folder: Path, *, num_train: int = 2000, num_val: int = 64, seed: int = 0) -> None:
    """``prompts_{train,val}.jsonl``: arithmetic questions with their ``answer`` for exact-match rewards."""
    rng = random.Random(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        rows = []
        for _ in range(count):
            q, answer = demo_question(rng)
            rows.append({"prompt": q, "answer": str(answer)})
        (folder / f"prompts_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def synthetic_folder(cache_dir: str | None) -> Path:
    return ensure_built(cache_root(cache_dir) / "synthetic" / "rl-prompts-v2", write_prompt_sets)


def arithmetic_conversations(cache_dir: str | None) -> list[list[Message]]:
    """The demo's train prompts with their answers: what the built-in policy's tokenizer and SFT see."""
    rows = [json.loads(line) for line in (synthetic_folder(cache_dir) / "prompts_train.jsonl").read_text().splitlines()]
    return [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]


def arithmetic_tokenizer(cache_dir: str | None, vocab_size: int = 512) -> Any:
    """The built-in arithmetic policy's tokenizer (a BPE on the demo conversations, chatml; cached)."""
    return build_tokenizer(None, "chatml", arithmetic_conversations(cache_dir), vocab_size, cache_dir)


class Prompts(Dataset):
    """Parsed records: ``messages`` (the prompt), ``prompt_ids``, the raw ``prompt``, ``fields`` and ``where``."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class RepeatingSampler(ResumableSampler):
    """A ``ResumableSampler`` whose stream repeats each block of ``batch_size`` indices ``repeat`` times.

    The skip count of a resumed run is in this expanded stream, so it lands on the exact repeat.
    An incomplete last block is dropped: every rollout has the same number of prompts.
    """

    def __init__(self, data_source: Dataset, *, batch_size: int, repeat: int, shuffle: bool, seed: int) -> None:
        super().__init__(data_source, shuffle=shuffle, seed=seed)
        self.batch_size, self.repeat = batch_size, repeat

    def _indices(self) -> list[int]:
        base = super()._indices()
        blocks = [base[i:i + self.batch_size] for i in range(0, len(base) - self.batch_size + 1, self.batch_size)]
        return [i for block in blocks for _ in range(self.repeat) for i in block]

    def __len__(self) -> int:
        return (super().__len__() // self.batch_size) * self.batch_size * self.repeat


class RepeatingDataLoader(ResumableDataLoader):
    """``ResumableDataLoader`` over a :class:`RepeatingSampler` (same checkpointed state)."""

    def __init__(self, dataset: Dataset, batch_size: int, *, repeat: int, seed: int, collate_fn: Any,
                 num_workers: int = 0) -> None:
        sampler = RepeatingSampler(dataset, batch_size=batch_size, repeat=repeat, shuffle=True, seed=seed)
        DataLoader.__init__(self, dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                            num_workers=num_workers, drop_last=True, persistent_workers=False)
        self.batches_yielded = 0


def collate_prompts(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Left-padded ``input_ids``/``attention_mask`` (for ``generate``) and the records for the rewards."""
    length = max(len(it["prompt_ids"]) for it in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["prompt_ids"])
        ids[i, length - n:] = torch.tensor(it["prompt_ids"])
        mask[i, length - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, "prompts": [it["prompt"] for it in items],
            "messages": [it["messages"] for it in items], "fields": [it["fields"] for it in items],
            "where": [it["where"] for it in items]}


class PromptDataModule(SourcedDataModule):
    """Prompts for online RL (grpo, ppo: each subclasses it under its own name).

    Args:
        train / val: files or ``hf:`` datasets with a ``prompt`` field (a string or a messages list) and any
            fields the rewards read, or a weighted mixture of sources (val: one or named sets); ``None`` uses
            the arithmetic demo prompts (with ``answer``).
        prompt_field: the field holding the prompt.
        chat_template: as sft's: ``auto``, ``tokenizer``, ``chatml``, ``llama3``.
        max_prompt_length: tokens; a longer prompt is an error naming its file and line.
        tokenizer: tokenizer to load (``model.name_or_path`` by default); ``None``: the built-in arithmetic
            policy's tokenizer (the default model's).
        vocab_size: size of that built-in tokenizer.
        batch_size: prompts per rollout (each gets ``objective.num_generations`` completions).
        num_workers, val_fraction, cache_dir, seed: as usual.
    """

    split_options = {"max_val": 256}

    def __init__(self, train: Any = None, val: Any = None, prompt_field: str = "prompt",
                 chat_template: Literal["auto", "tokenizer", "chatml", "llama3"] = "auto",
                 max_prompt_length: int = 256, tokenizer: str | None = None, vocab_size: int = 512,
                 batch_size: int = 8, num_workers: Workers = "auto", val_fraction: float = 0.05, cache_dir: str | None = None,
                 seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        self.prompt_field = prompt_field
        self.chat_template, self.max_prompt_length = chat_template, max_prompt_length
        self.tokenizer_name, self.vocab_size = tokenizer, vocab_size
        self.repeat = 1  # set by the objective: optimiser steps per rollout

    def synthetic_data(self) -> tuple[str, str]:
        folder = synthetic_folder(self.cache_dir)
        return str(folder / "prompts_train.jsonl"), str(folder / "prompts_val.jsonl")

    # ---- one record -----------------------------------------------------------------
    def parse(self, record: Record) -> dict[str, Any]:
        data = record.data
        prompt = data.get(self.prompt_field)
        if prompt is None:
            raise DataError(f"missing field {self.prompt_field!r} (keys present: {sorted(data)})",
                            source=record.source, location=record.location)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"empty {self.prompt_field!r}", source=record.source, location=record.location)
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
            messages = check_messages([dict(m) for m in prompt], record, need_assistant=False, field=self.prompt_field)
            if not any(str(m.get("content") or "").strip() for m in messages):
                raise DataError(f"empty {self.prompt_field!r}: every message is blank", source=record.source,
                                location=record.location)
        else:
            raise DataError(f"{self.prompt_field!r} must be a non-empty string or a list of {{'role', 'content'}} "
                            f"messages, got {type(prompt).__name__}", source=record.source, location=record.location)
        fields = {k: v for k, v in data.items() if k != self.prompt_field}
        return {"prompt": prompt, "messages": messages, "fields": fields, "where": record.where()}

    def read(self, spec: Any, what: str) -> list[dict[str, Any]]:
        rows = [self.parse(r) for r in read_records(spec, what=what)]
        if not rows:
            raise DataError(f"{what}: no prompts in {spec!r}")
        report_repeats(((json.dumps(r["messages"], sort_keys=True, default=str), r["where"]) for r in rows), what=what,
                       kind="prompt", note="a repeated prompt is sampled more often")
        return rows

    def _tokenize(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            row["prompt_ids"] = tokenize_prompt(self.processor, row["messages"])
            if len(row["prompt_ids"]) > self.max_prompt_length:
                raise DataError(f"prompt of {len(row['prompt_ids'])} tokens is longer than data.max_prompt_length="
                                f"{self.max_prompt_length}", source=row["where"])
            out.append(row)
        return out

    # ---- the sets -----------------------------------------------------------------
    def fit(self, train_items: list[dict[str, Any]]) -> None:
        if len(train_items) < self.batch_size:
            raise DataError(f"data.train has {len(train_items)} prompt(s), fewer than data.batch_size="
                            f"{self.batch_size}", hint=f"lower data.batch_size (at most {len(train_items)}) or add prompts")
        if self.tokenizer_name:
            self.processor = build_tokenizer(self.tokenizer_name, self.chat_template, [], self.vocab_size,
                                             self.cache_dir)
        else:
            self.processor = arithmetic_tokenizer(self.cache_dir, self.vocab_size)
        self.processor.padding_side = "left"

    def build(self, items: list[dict[str, Any]], what: str) -> Prompts:
        with preparing(f"{what}: tokenising", total=len(items), unit="prompt") as progress:
            return Prompts(self._tokenize(progress.track(items)))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_prompts(items, self.processor.pad_token_id)

    _collate = collate

    def train_dataloader(self) -> RepeatingDataLoader:
        self.setup()
        return RepeatingDataLoader(self.train_set, self.batch_size, repeat=self.repeat, seed=self.seed,
                                   collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> ResumableDataLoader | list[ResumableDataLoader]:
        self.setup()
        loaders = [ResumableDataLoader(dataset, self.batch_size * 4, shuffle=False, collate_fn=self.collate,
                                       num_workers=self.num_workers, what=f"data.val ({name})")
                   for name, dataset in self.val_sets.items()]
        return loaders[0] if len(loaders) == 1 else loaders

    def model_hints(self) -> dict[str, Any]:
        t = self.processor
        return {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id}

    def sample_inputs(self, n: int) -> list[dict[str, Any]]:
        val_set = self.val_set
        return [val_set[i] for i in range(min(n, len(val_set)))]
