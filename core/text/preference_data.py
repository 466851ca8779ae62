"""Preference data: pairs (prompt / chosen / rejected) or KTO's unpaired labelled completions.

Prompts and completions may be strings or ``messages`` lists; both go through the
chat template (the same as sft's, so an sft run's output is a valid start). Published
preference formats are read as they are (:mod:`~modalforge.text.preferences`:
UltraFeedback's shared turns, HH-RLHF's implicit prompt, SHP, ranked lists), after
``data.columns`` / ``data.roles`` mapped their fields. Chosen and rejected are collated
into one batch so the policy sees them in a single forward.

Empty values / truncated media / duplicates / mixed types: as :mod:`~modalforge.text.preferences`
says for pairs; a KTO record needs a non-blank completion and a ``label`` that is a boolean or 0/1
(a 2, or ``"false"``, is an error). A pair repeated, or contradicted (the same prompt with chosen
and rejected swapped; annotators disagree), is kept: one warning per source counts each.
"""

from __future__ import annotations

import json
import logging

from typing import Any, Iterable, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.duplicates import report_repeats
from modalforge.data.workers import Workers
from modalforge.progress import preparing
from modalforge.data.readers import Record, read_records, require_fields
from modalforge.text.formats import Message, as_messages, check_messages, record_tools
from modalforge.text.mapping import check_mapping, map_record, mapping_for
from modalforge.text.preferences import RankedPairs, preference_pairs
from modalforge.text.synthetic import write_alignment_sets
from modalforge.text.token_cache import Ragged, cache_folder, cached, code_digest, items_digest, ragged, \
    tokenizer_digest
from modalforge.text.tokenize import tokenize_completion, tokenize_prompt
from modalforge.text.tokenizer import build_tokenizer


log = logging.getLogger(__name__)


def _messages(record: Record, field: str, role: str) -> list[Message]:
    messages = as_messages(record.data[field], role, record, field)
    return check_messages(messages, record, need_assistant=False, field=field)


class Preferences(Dataset):
    """Tokenised examples: dicts of token lists, each with ``index``: its place among all examples of its
    split (stable across a mixture's sources), which keys precomputed reference log-probs."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {**item, "index": item.get("uid", index)}


def truncate_pair(prompt: list[int], completions: dict[str, list[int]], max_length: int,
                  mode: str) -> tuple[list[int], dict[str, list[int]]]:
    """Prompt and completions cut so that prompt + the longest completion fit ``max_length`` (TRL's modes).

    ``keep_start`` keeps the beginning of each sequence: completions lose their end first, then the prompt
    its end; ``keep_end`` keeps the end: the prompt loses its start first, then completions their start.
    At least one prompt token and one completion token always remain."""
    longest = max(len(c) for c in completions.values())
    over = len(prompt) + longest - max_length
    if over <= 0:
        return prompt, completions
    if mode == "keep_end":
        cut = min(over, len(prompt) - 1)
        prompt, over = prompt[cut:], over - cut
        if over > 0:
            completions = {k: c[max(0, len(c) - (max_length - len(prompt))):] for k, c in completions.items()}
        return prompt, completions
    room = max(1, max_length - len(prompt))
    completions = {k: c[:room] for k, c in completions.items()}
    if len(prompt) + max(len(c) for c in completions.values()) > max_length:
        prompt = prompt[: max_length - max(len(c) for c in completions.values())]
    return prompt, completions


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


def _warn_dropped(count: int, max_length: int, first: str) -> None:
    log.warning("%d example(s) longer than data.max_length=%d dropped (data.too_long=drop), first: %s",
                count, max_length, first)


class PreferenceDataModule(SourcedDataModule):
    """Preference data: what dpo and reward_model train on (each subclasses it for its name and defaults).

    A mixture source may carry its own ``columns`` / ``roles`` (``{path: ..., columns: {...}}``),
    which replace ``data.columns`` / ``data.roles`` for that source.

    Args:
        train / val: sources as every plugin takes them (files, ``hf:``, a weighted mixture, named
            validation sets); ``None`` generates the arithmetic demo pairs.
        kind: ``pairs`` (prompt/chosen/rejected, SHP, ranked lists...) or ``kto`` (prompt/completion/label).
        columns: the dataset's column for each field a format names (``{prompt: question, chosen: good}``),
            applied before the format is detected.
        roles: role names mapped to ``system``/``user``/``assistant`` (``{human: user, gpt: assistant}``).
        ranked_pairs: a ranked record (``responses`` + ``scores``/``ranks``) as its ``best_worst`` pair or
            ``all`` ordered pairs (ties skipped).
        chat_template: as sft's: ``auto``, ``tokenizer``, ``chatml``, ``llama3``.
        max_length: prompt + completion tokens.
        too_long: a longer example is an ``error`` naming file and line (default), is ``truncate``d, or is
            ``drop``ped (counted and reported).
        truncation_mode: TRL's: ``keep_start`` cuts the end of the completion (then of the prompt),
            ``keep_end`` cuts the start of the prompt (then of the completion).
        tokenizer / vocab_size: tokenizer to load, or size of the BPE trained on the data when ``None``.
        token_cache: where the tokenised examples are kept so that a second start skips tokenising:
            ``auto`` (``<cache_dir>/tokenized``), ``off``, or a folder (:mod:`modalforge.text.token_cache`).
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None, kind: Literal["pairs", "kto"] = "pairs",
                 chat_template: str = "auto", max_length: int = 256,
                 too_long: Literal["error", "truncate", "drop"] = "error",
                 truncation_mode: Literal["keep_start", "keep_end"] = "keep_start", tokenizer: str | None = None,
                 vocab_size: int = 512, batch_size: int = 16, num_workers: Workers = "auto", val_fraction: float = 0.05,
                 cache_dir: str | None = None, seed: int = 0, columns: dict[str, str] | None = None,
                 roles: dict[str, str] | None = None, ranked_pairs: RankedPairs = "best_worst",
                 token_cache: str | bool = "auto") -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        if kind not in ("pairs", "kto"):
            raise DataError(f"data.kind={kind!r} is not one of: pairs, kto")
        self.kind, self.chat_template, self.max_length = kind, chat_template, max_length
        self.too_long, self.truncation_mode = too_long, truncation_mode
        self.tokenizer_name, self.vocab_size = tokenizer, vocab_size
        if ranked_pairs not in ("best_worst", "all"):
            raise DataError(f"data.ranked_pairs={ranked_pairs!r} is not one of: best_worst, all")
        self.columns, self.roles = check_mapping(columns, roles)
        self.ranked_pairs: RankedPairs = ranked_pairs
        self.token_cache = token_cache
        self.token_cache_entries: dict[str, Any] = {}  # what -> (entry folder or None, read from it?, examples)
        self._reference: dict[str, Preferences] = {}

    source_options = ("columns", "roles")

    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "alignment-v1", write_alignment_sets)
        prefix = "pairs" if self.kind == "pairs" else "kto"
        return str(folder / f"{prefix}_train.jsonl"), str(folder / f"{prefix}_val.jsonl")

    def parse(self, record: Record) -> dict[str, Any]:
        """The record's (first) pair, or its KTO example; :meth:`read` keeps every pair of a ranked record."""
        return self._parse_all(record)[0]

    def read(self, spec: Any, what: str) -> list[dict[str, Any]]:
        mapping = mapping_for(self, what)
        items = [item for record in read_records(spec, what=what) for item in self._parse_all(record, *mapping)]
        if not items:
            raise DataError(f"{what}: no records in {spec!r}")
        self._report_repeats(items, what)
        return items

    def _report_repeats(self, items: list[dict[str, Any]], what: str) -> None:
        """Repeated pairs, and pairs another record contradicts, counted in one warning each."""
        keys = ("chosen", "rejected") if self.kind == "pairs" else ("completion", "label")
        key = lambda item, order=keys: json.dumps([item["prompt"], *(item[k] for k in order)], sort_keys=True)  # noqa: E731
        report_repeats(((key(it), it["where"]) for it in items), what=what, kind="example",
                       note="repeats weigh more; deduplicate upstream if unwanted")
        if self.kind == "pairs":
            chosen = {key(it): it["where"] for it in items}
            swapped = [(it["where"], chosen[key(it, ("rejected", "chosen"))]) for it in items
                       if key(it, ("rejected", "chosen")) in chosen]
            if swapped:
                log.warning("%s: %d pair(s) are contradicted by another with chosen and rejected swapped, kept "
                            "(first: %s against %s)", what, len(swapped), *swapped[0])

    def _parse_all(self, record: Record, columns: dict[str, str] | None = None,
                   roles: dict[str, str] | None = None) -> list[dict[str, Any]]:
        record = map_record(record, self.columns if columns is None else columns,
                            self.roles if roles is None else roles)
        if self.kind == "pairs":
            tools = record_tools(record)
            return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": record.where(),
                     "tools": tools} for prompt, chosen, rejected in preference_pairs(record, self.ranked_pairs)]
        return [self._kto(record)]

    def _kto(self, record: Record) -> dict[str, Any]:
        require_fields(record, {"prompt": (str, list), "completion": (str, list), "label": (bool, int)})
        if record.data["label"] not in (0, 1):
            raise DataError(f"KTO 'label' is {record.data['label']!r}, expected true/false (or 1/0)",
                            source=record.source, location=record.location)
        return {"prompt": _messages(record, "prompt", "user"),
                "completion": _messages(record, "completion", "assistant"),
                "label": bool(record.data["label"]), "where": record.where(), "tools": record_tools(record)}

    def fit(self, train_items: list[dict[str, Any]]) -> None:
        keys = ("chosen", "rejected") if self.kind == "pairs" else ("completion",)
        conversations = [r["prompt"] + r[k] for r in train_items for k in keys]
        self.processor = build_tokenizer(self.tokenizer_name, self.chat_template, conversations, self.vocab_size,
                                         self.cache_dir)
        for uid, row in enumerate(train_items):
            row["uid"] = uid

    def build(self, items: list[dict[str, Any]], what: str) -> Preferences:
        keys = ("prompt", "chosen", "rejected") if self.kind == "pairs" else ("prompt", "completion")
        fields = (*keys, "label", "tools", "where", "uid")
        key = {"items": items_digest(items, lambda row: [row.get(k) for k in fields]),
               "tokenizer": tokenizer_digest(self.processor),
               "options": {"kind": self.kind, "max_length": self.max_length, "too_long": self.too_long,
                           "truncation_mode": self.truncation_mode, "chat_template": self.chat_template,
                           "columns": self.columns, "roles": self.roles, "ranked_pairs": self.ranked_pairs},
               "code": code_digest(__name__, "modalforge.text.tokenize", "modalforge.text.spans",
                                   "modalforge.text.preferences", "modalforge.text.formats",
                                   "modalforge.text.templates")}
        (arrays, meta), hit, entry = cached(f"{self.kind}-{what}", cache_folder(self.token_cache, self.cache_dir), key,
                                            lambda: self._encode(items, what, keys))
        self.token_cache_entries[what] = (entry, hit, int(len(arrays["uid"])))
        if hit:
            if items:  # the template's generation-prompt check, which tokenising the prompts would have made
                tokenize_prompt(self.processor, items[0]["prompt"], tools=items[0].get("tools"),
                                where=items[0]["where"])
            if meta["dropped"]:
                _warn_dropped(meta["dropped"], self.max_length, meta["first_dropped"])
            log.info("%s: %d examples read from the token cache %s", what, len(arrays["uid"]), entry)
        columns = {k: Ragged(arrays[k], arrays[f"{k}_offsets"]) for k in keys}
        uids, labels = arrays["uid"].tolist(), arrays["label"].tolist() if "label" in arrays else None
        out = []
        for i, uid in enumerate(uids):
            item: dict[str, Any] = {k: columns[k][i] for k in keys}
            item["uid"] = uid
            if labels is not None:
                item["label"] = bool(labels[i])
            out.append(item)
        return Preferences(out)

    def _encode(self, items: list[dict[str, Any]], what: str,
                keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Tokenise: the arrays and meta of a token cache entry."""
        with preparing(f"{what}: tokenising", total=len(items), unit="example") as progress:
            rows = self._tokenize(progress.track(items))
        arrays: dict[str, np.ndarray] = {"uid": np.array([r["uid"] for r in rows], dtype=np.int64)}
        for k in keys:
            arrays[k], arrays[f"{k}_offsets"] = ragged([r[k] for r in rows])
        if self.kind == "kto":
            arrays["label"] = np.array([bool(r["label"]) for r in rows], dtype=np.bool_)
        dropped = getattr(self, "_dropped", [])
        return arrays, {"examples": len(rows), "dropped": len(dropped),
                        "first_dropped": dropped[0] if dropped else None}

    def _tokenize(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        items, dropped = [], []
        keys = ("chosen", "rejected") if self.kind == "pairs" else ("completion",)
        for position, row in enumerate(rows):
            tools, where = row.get("tools"), row["where"]
            prompt = tokenize_prompt(self.processor, row["prompt"], tools=tools, where=where)
            item: dict[str, Any] = {"prompt": prompt, "uid": row.get("uid", position)}
            completions = {key: tokenize_completion(self.processor, row["prompt"], row[key], tools=tools, where=where)
                           for key in keys}
            longest = max(len(c) for c in completions.values())
            if len(prompt) + longest > self.max_length:
                if self.too_long == "error":
                    key = max(completions, key=lambda k: len(completions[k]))
                    raise DataError(f"prompt + {key} is {len(prompt) + longest} tokens, longer than data.max_length="
                                    f"{self.max_length}", source=row["where"],
                                    hint="raise data.max_length, or set data.too_long=truncate|drop")
                if self.too_long == "drop":
                    dropped.append(row["where"])
                    continue
                item["prompt"], completions = truncate_pair(prompt, completions, self.max_length,
                                                            self.truncation_mode)
            item.update(completions)
            if self.kind == "kto":
                item["label"] = row["label"]
            items.append(item)
        self._dropped = dropped
        if dropped:
            _warn_dropped(len(dropped), self.max_length, dropped[0])
        if not items:
            raise DataError(f"no example fits data.max_length={self.max_length}")
        return items

    def reference_sets(self) -> dict[str, Preferences]:
        """Every train example (all sources, in ``index`` order) and the first validation set, for
        reference log-probs computed once."""
        if not self._reference:
            train = sorted((item for dataset in self._datasets(self.train_set) for item in dataset.items),
                           key=lambda item: item["uid"])
            unique = list({item["uid"]: item for item in train}.values())
            self._reference = {"train": Preferences(unique), "val": self.val_set}
        return self._reference

    @staticmethod
    def _datasets(dataset: Any) -> list[Preferences]:
        return list(getattr(dataset, "datasets", [dataset]))

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.processor.pad_token_id
        return collate_pairs(items, pad) if self.kind == "pairs" else collate_kto(items, pad)

    _collate = collate  # the reference pre-computation's name for it

    def val_dataloader(self) -> Any:
        if self.kind == "kto":  # KTO's KL estimate pairs each completion with the next one's prompt
            self.drop_last_val = True
        return super().val_dataloader()

    def model_hints(self) -> dict[str, Any]:
        t = self.processor
        return {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id}

    def sample_inputs(self, n: int) -> list[list[Message]]:
        return [row["prompt"] for row in self.first_val_items()[:n]]
