"""dpo data: preference pairs (prompt / chosen / rejected) or KTO's unpaired labelled completions.

Prompts and completions may be strings or ``messages`` lists; both go through the
chat template (the same as sft's, so an sft run's output is a valid start). Chosen
and rejected are collated into one batch so the policy sees them in a single forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.readers import Record, read_records, require_fields
from modalforge.data.splits import split_train_val
from modalforge.interfaces import DataModule
from modalforge.plugins.text.chat.formats import Message
from modalforge.plugins.text.chat.synthetic import write_alignment_sets
from modalforge.plugins.text.chat.tokenize import tokenize_completion, tokenize_prompt
from modalforge.plugins.text.chat.tokenizer import build_tokenizer


def _messages(value: Any, role: str) -> list[Message]:
    return [dict(m) for m in value] if isinstance(value, list) else [{"role": role, "content": str(value)}]


class Preferences(Dataset):
    """Tokenised examples: dicts of token lists (+ ``index`` for precomputed reference log-probs)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.items[index], "index": index}


def _sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    completion_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p): len(p) + len(c)] = True
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": completion_mask}


def collate_pairs(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences: the B chosen, then the B rejected."""
    prompts = [it["prompt"] for it in items] * 2
    completions = [it["chosen"] for it in items] + [it["rejected"] for it in items]
    return {**_sequences(prompts, completions, pad_id), "index": torch.tensor([it["index"] for it in items])}


def collate_kto(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """B (prompt, completion) sequences, then B mismatched ones (prompt i, completion i+1) for the KL estimate."""
    prompts = [it["prompt"] for it in items]
    completions = [it["completion"] for it in items]
    shifted = completions[1:] + completions[:1]
    return {**_sequences(prompts * 2, completions + shifted, pad_id),
            "desirable": torch.tensor([it["label"] for it in items]),
            "index": torch.tensor([it["index"] for it in items])}


class DPODataModule(DataModule):
    """Preference data for the dpo plugin.

    Args:
        train / val: files or ``hf:`` datasets; ``None`` generates the arithmetic demo pairs.
        kind: ``pairs`` (prompt/chosen/rejected) or ``kto`` (prompt/completion/label).
        chat_template: as sft's: ``auto``, ``tokenizer``, ``chatml``, ``llama3``.
        max_length: prompt + completion tokens; longer examples are an error naming file and line.
        tokenizer / vocab_size: tokenizer to load, or size of the BPE trained on the data when ``None``.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None, kind: str = "pairs", chat_template: str = "auto",
                 max_length: int = 256, tokenizer: str | None = None, vocab_size: int = 512, batch_size: int = 16,
                 num_workers: int = 0, val_fraction: float = 0.05, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if kind not in ("pairs", "kto"):
            raise DataError(f"data.kind={kind!r} is not one of: pairs, kto")
        self.train_spec, self.val_spec, self.kind = train, val, kind
        self.chat_template, self.max_length = chat_template, max_length
        self.tokenizer_name, self.vocab_size = tokenizer, vocab_size
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        self.cache_dir, self.seed = cache_dir, seed
        self.train_set: Preferences | None = None
        self.val_set: Preferences | None = None
        self.val_prompts: list[list[Message]] = []

    def _synthetic(self) -> Path:
        return ensure_built(cache_root(self.cache_dir) / "synthetic" / "alignment-v1", write_alignment_sets)

    def prepare_data(self) -> None:
        if self.train_spec is None:
            self._synthetic()

    def _parse(self, record: Record) -> dict[str, Any]:
        if self.kind == "pairs":
            require_fields(record, {"prompt": (str, list), "chosen": (str, list), "rejected": (str, list)})
            return {"prompt": _messages(record.data["prompt"], "user"),
                    "chosen": _messages(record.data["chosen"], "assistant"),
                    "rejected": _messages(record.data["rejected"], "assistant"), "where": record.where()}
        require_fields(record, {"prompt": (str, list), "completion": (str, list), "label": (bool, int)})
        return {"prompt": _messages(record.data["prompt"], "user"),
                "completion": _messages(record.data["completion"], "assistant"),
                "label": bool(record.data["label"]), "where": record.where()}

    def _read(self, spec: Any, what: str) -> list[dict[str, Any]]:
        rows = [self._parse(r) for r in read_records(spec, what=what)]
        if not rows:
            raise DataError(f"{what}: no records in {spec!r}")
        return rows

    def _tokenize(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items = []
        for row in rows:
            item: dict[str, Any] = {"prompt": tokenize_prompt(self.processor, row["prompt"])}
            keys = ("chosen", "rejected") if self.kind == "pairs" else ("completion",)
            for key in keys:
                item[key] = tokenize_completion(self.processor, row["prompt"], row[key])
                if len(item["prompt"]) + len(item[key]) > self.max_length:
                    raise DataError(f"prompt + {key} is {len(item['prompt']) + len(item[key])} tokens, longer than "
                                    f"data.max_length={self.max_length}", source=row["where"])
            if self.kind == "kto":
                item["label"] = row["label"]
            items.append(item)
        return items

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.train_spec is None:
            folder = self._synthetic()
            prefix = "pairs" if self.kind == "pairs" else "kto"
            train = self._read(str(folder / f"{prefix}_train.jsonl"), "data.train")
            val = self._read(str(folder / f"{prefix}_val.jsonl"), "data.val")
        else:
            train = self._read(self.train_spec, "data.train")
            if self.val_spec is not None:
                val = self._read(self.val_spec, "data.val")
            else:
                train, val = split_train_val(train, val_fraction=self.val_fraction, seed=self.seed)
        keys = ("prompt", "chosen", "rejected") if self.kind == "pairs" else ("prompt", "completion")
        conversations = [r["prompt"] + r[k] for r in train for k in keys[1:]]
        self.processor = build_tokenizer(self.tokenizer_name, self.chat_template, conversations, self.vocab_size,
                                         self.cache_dir)
        self.train_set, self.val_set = Preferences(self._tokenize(train)), Preferences(self._tokenize(val))
        self.val_prompts = [r["prompt"] for r in val]

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.processor.pad_token_id
        return collate_pairs(items, pad) if self.kind == "pairs" else collate_kto(items, pad)

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.train_set, self.batch_size, shuffle=True, seed=self.seed,
                                   collate_fn=self._collate, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.val_set, self.batch_size, shuffle=False, collate_fn=self._collate,
                                   num_workers=self.num_workers, drop_last=self.kind == "kto")

    def model_hints(self) -> dict[str, Any]:
        t = self.processor
        return {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id}

    def sample_inputs(self, n: int) -> list[list[Message]]:
        return self.val_prompts[:n]
