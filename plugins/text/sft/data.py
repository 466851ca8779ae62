"""sft data: instruction / chat records -> chat template -> tokens with an assistant-only loss mask.

Records in any supported format (prompt/completion, OpenAI messages with tool calls,
Alpaca, ShareGPT, Dolly, OASST message trees) become ``messages``, after ``data.columns`` /
``data.roles`` mapped their fields, are rendered by the chat template, and only
assistant tokens are learned (``data.train_on=all`` learns everything; a message's
``train: false`` / ``weight: 0`` masks it). Pre-tokenised records (``input_ids``, with
``labels`` / ``attention_mask`` when given) are used as they are. With
``data.packing=true`` short examples share rows without seeing each other; the
padding share with and without packing is logged either way.

Empty values / truncated media / duplicates / mixed types: ``null`` or a blank answer (completion,
output, an unmasked assistant turn) is an error naming file and line; a blank prompt is kept. A
repeated conversation is kept and counted (one warning per source); OASST message ids twice, or
``parent_id`` cycles, are errors. A number where text belongs is an error, never ``str()``'d;
``input_ids`` must be integers. No media.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Literal, Sequence

import numpy as np

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.duplicates import report_repeats
from modalforge.data.workers import Workers
from modalforge.data.readers import Record, read_records
from modalforge.progress import preparing
from modalforge.text.formats import (Message, check_messages, fold_system, is_oasst_row, record_tools,
                                                  resolve_format, split_prompt, to_messages, train_flags)
from modalforge.text.mapping import check_mapping, map_record, mapping_for
from modalforge.text.oasst import join_rows, tree_paths
from modalforge.text.packing import collate_rows, pack_first_fit
from modalforge.text.synthetic import write_alignment_sets
from modalforge.text.token_cache import Ragged, cache_folder, cached, code_digest, items_digest, ragged, \
    tokenizer_digest
from modalforge.text.tokenize import IGNORE, Tokenized, tokenize_conversation
from modalforge.text.tokenizer import build_tokenizer

log = logging.getLogger(__name__)
#: One parsed record: its messages (or, pre-tokenised, its tokens), where it was read (file, line), its ``tools``
#: for the template and, per assistant message, whether it is learned.
Item = tuple[list[Message] | Tokenized, str, list[dict[str, Any]] | None, list[bool] | None]


class Rows(Dataset):
    """Rows of one (unpacked) or several (packed) tokenised examples."""

    def __init__(self, rows: Sequence[list[Tokenized]]) -> None:
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

    A mixture source may carry its own ``columns`` / ``roles`` (``{path: ..., columns: {...}}``),
    which replace ``data.columns`` / ``data.roles`` for that source.

    Args:
        train / val: sources as every plugin takes them (files, globs, shards, ``hf:``, a weighted
            mixture, named validation sets); ``None`` generates the arithmetic demo set.
        format: force a record format (``prompt_completion``, ``messages``, ``alpaca``, ``sharegpt``, ``dolly``,
            ``oasst``, ``pretokenized``); ``None`` detects (a record that fits two is an error).
        columns: the dataset's column for each field a format names (``{prompt: question, completion: answer}``;
            ``role`` / ``content`` map keys inside messages), applied before the format is detected.
        roles: role names mapped to ``system``/``user``/``assistant``/``tool`` (``{human: user, gpt: assistant}``).
        oasst_paths: OASST trees as their ``best``-ranked path (one conversation per tree) or ``all`` paths.
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
        token_cache: where the tokenised (and packed) examples are kept so that a second start skips
            tokenising: ``auto`` (``<cache_dir>/tokenized``), ``off``, or a folder
            (:mod:`modalforge.text.token_cache`; ``modalforge preprocess`` fills it ahead of time).
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None,
                 format: Literal["prompt_completion", "messages", "alpaca", "sharegpt", "dolly", "oasst",
                                 "pretokenized"] | None = None,
                 chat_template: str = "auto", system_prompt: Literal["keep", "fold"] = "keep",
                 train_on: Literal["assistant", "all"] = "assistant",
                 max_length: int = 256, too_long: Literal["error", "truncate", "drop"] = "error",
                 packing: bool = True, packing_attention: Literal["position_ids", "dense"] = "position_ids",
                 tokenizer: str | None = None, vocab_size: int = 512, batch_size: int = 16,
                 num_workers: Workers = "auto", val_fraction: float = 0.05, cache_dir: str | None = None,
                 seed: int = 0, columns: dict[str, str] | None = None, roles: dict[str, str] | None = None,
                 oasst_paths: Literal["best", "all"] = "best", token_cache: str | bool = "auto") -> None:
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
        if oasst_paths not in ("best", "all"):
            raise DataError(f"data.oasst_paths={oasst_paths!r} is not one of: best, all")
        self.columns, self.roles = check_mapping(columns, roles)
        self.oasst_paths = oasst_paths
        self.token_cache = token_cache
        self.token_cache_entries: dict[str, Any] = {}  # what -> (entry folder or None, read from it?, examples)
        self.stats: dict[str, float] = {}

    source_options = ("columns", "roles")

    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "alignment-v1", write_alignment_sets)
        return str(folder / "sft_train.jsonl"), str(folder / "sft_val.jsonl")

    def parse(self, record: Record) -> Item:
        return self._parse_mapped(map_record(record, self.columns, self.roles))

    def _parse_mapped(self, record: Record) -> Item:
        if resolve_format(record, self.format) == "pretokenized":
            return pretokenized(record), record.where(), None, None
        return self._item(to_messages(record, self.format), record)

    def _item(self, messages: list[Message], record: Record, check: bool = False) -> Item:
        messages, learn = train_flags(check_messages(messages, record) if check else messages, record)
        if self.system_prompt == "fold":
            messages = fold_system(messages)
        return messages, record.where(), record_tools(record), (None if all(learn) else learn)

    def read(self, spec: Any, what: str) -> list[Item]:
        """Every conversation of one source: a record each, an OASST tree its path(s), its rows joined first."""
        items: list[Item] = []
        rows: list[Record] = []
        columns, roles = mapping_for(self, what)
        for record in read_records(spec, what=what):
            mapped = map_record(record, columns, roles)
            fmt = resolve_format(mapped, self.format)
            if fmt == "oasst" and is_oasst_row(mapped.data):
                rows.append(mapped)
            elif fmt == "oasst":
                items += [self._item(p, mapped, check=True)
                          for p in tree_paths(mapped.data["prompt"], mapped, self.oasst_paths)]
            else:
                items.append(self._parse_mapped(mapped))
        for root, record in join_rows(rows):
            items += [self._item(p, record, check=True) for p in tree_paths(root, record, self.oasst_paths)]
        if not items:
            raise DataError(f"{what}: no conversations in {spec!r}")
        report_repeats(((_item_key(item), item[1]) for item in items), what=what, kind="conversation",
                       note="repeats weigh more; deduplicate upstream if unwanted")
        return items

    def fit(self, train_items: list[Item]) -> None:
        if self.tokenizer_name is None and any(isinstance(m, Tokenized) for m, *_ in train_items):
            raise DataError("pre-tokenised records (input_ids) need the tokenizer that made them: set "
                            "data.tokenizer= (or model.name_or_path=)")
        self.processor = build_tokenizer(self.tokenizer_name, self.chat_template,
                                         [m for m, *_ in train_items if not isinstance(m, Tokenized)],
                                         self.vocab_size, self.cache_dir)

    def _tokenize(self, conversations: Iterable[Item], what: str) -> list[Tokenized]:
        examples, dropped = [], []
        for messages, where, tools, learn in conversations:
            if isinstance(messages, Tokenized):
                example = messages
                if max(example.input_ids) >= len(self.processor):
                    raise DataError(f"input_ids hold token {max(example.input_ids)}, beyond the tokenizer's "
                                    f"{len(self.processor)} tokens: tokenised with another tokenizer?", source=where)
            else:
                example = tokenize_conversation(self.processor, messages, train_on=self.train_on, tools=tools,
                                                where=where, learn=learn)
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
        self._dropped = dropped
        if dropped:
            _warn_dropped(what, len(dropped), dropped[0])
        if not examples:
            raise DataError(f"{what}: no example left to train on")
        return examples

    def build(self, items: list[Item], what: str) -> Rows:
        key = {"items": items_digest(items, _item_encode), "tokenizer": tokenizer_digest(self.processor),
               "options": {"train_on": self.train_on, "max_length": self.max_length, "too_long": self.too_long,
                           "packing": self.packing, "chat_template": self.chat_template,
                           "system_prompt": self.system_prompt, "format": self.format, "columns": self.columns,
                           "roles": self.roles, "oasst_paths": self.oasst_paths},
               "code": code_digest(__name__, "modalforge.text.tokenize", "modalforge.text.spans",
                                   "modalforge.text.packing", "modalforge.text.formats", "modalforge.text.templates")}
        (arrays, meta), hit, entry = cached(f"sft-{what}", cache_folder(self.token_cache, self.cache_dir), key,
                                            lambda: self._encode(items, what))
        self.token_cache_entries[what] = (entry, hit, int(meta["examples"]))
        if hit and meta["dropped"]:
            _warn_dropped(what, meta["dropped"], meta["first_dropped"])
        offsets = arrays["offsets"]
        examples = _Examples(Ragged(arrays["input_ids"], offsets), Ragged(arrays["labels"], offsets))
        lengths = examples.input_ids.lengths()
        packed = _PackedRows(examples, arrays["order"], arrays["row_offsets"])
        if what.startswith("data.train"):
            row_lengths = np.add.reduceat(lengths[arrays["order"]], arrays["row_offsets"][:-1]) if len(packed) else []
            self.stats = {"padding_share_unpacked": padding_share(lengths.tolist(), self.batch_size),
                          "padding_share_packed": padding_share(list(row_lengths), self.batch_size)}
        if hit:
            share = ""
            if what.startswith("data.train"):
                share = (f"; padding share {100 * self.stats['padding_share_packed']:.1f}% packed vs "
                         f"{100 * self.stats['padding_share_unpacked']:.1f}% unpacked")
            log.info("sft %s: %d examples -> %d packed rows%s, read from the token cache %s", what, len(examples),
                     len(packed), share, entry)
        return Rows(packed if self.packing else _SingleRows(examples))

    def _encode(self, items: list[Item], what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Tokenise and pack: the arrays and meta of a token cache entry."""
        with preparing(f"sft {what}: tokenising", total=len(items), unit="conversation") as progress:
            examples = self._tokenize(progress.track(items), what)
            packed = pack_first_fit([_Index(i, len(e)) for i, e in enumerate(examples)], self.max_length)
            progress.summary = f"{len(examples)} examples -> {len(packed)} packed rows"
            if what.startswith("data.train"):
                lengths = [len(e) for e in examples]
                unpacked = padding_share(lengths, self.batch_size)
                share = padding_share([sum(len(e) for e in r) for r in packed], self.batch_size)
                progress.summary += f"; padding share {100 * share:.1f}% packed vs {100 * unpacked:.1f}% unpacked"
        ids, offsets = ragged([e.input_ids for e in examples])
        labels, _ = ragged([e.labels for e in examples])
        order = np.array([e.index for row in packed for e in row], dtype=np.int64)
        row_offsets = np.zeros(len(packed) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in packed], out=row_offsets[1:])
        dropped = getattr(self, "_dropped", [])
        return ({"input_ids": ids, "labels": labels, "offsets": offsets, "order": order, "row_offsets": row_offsets},
                {"examples": len(examples), "rows": len(packed), "dropped": len(dropped),
                 "first_dropped": dropped[0] if dropped else None})

    def collate(self, rows: list[list[Tokenized]]) -> dict[str, torch.Tensor]:
        return collate_rows(rows, self.processor.pad_token_id, self.packing, attention=self.packing_attention)

    _collate = collate

    def model_hints(self) -> dict[str, Any]:
        t = self.processor
        return {"vocab_size": len(t), "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id,
                "eos_token_id": t.eos_token_id}

    def sample_inputs(self, n: int) -> list[list[Message]]:
        return [split_prompt(m)[0] for m, *_ in self.first_val_items() if not isinstance(m, Tokenized)][:n]


def _warn_dropped(what: str, count: int, first: str) -> None:
    log.warning("%s: %d example(s) dropped (too long, or nothing left to learn), first: %s", what, count, first)


class _Index:
    """An example's place and length, packed in its stead (the token cache keeps the row layout as indices)."""

    __slots__ = ("index", "length")

    def __init__(self, index: int, length: int) -> None:
        self.index, self.length = index, length

    def __len__(self) -> int:
        return self.length


class _View(Sequence):
    """A read-only list over a token cache entry's arrays: an index (negative too) or a slice."""

    def _get(self, index: int) -> Any:
        raise NotImplementedError

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._get(int(index) % len(self))


class _Examples(_View):
    """Tokenised examples, each read when asked for."""

    def __init__(self, input_ids: Ragged, labels: Ragged) -> None:
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def _get(self, index: int) -> Tokenized:
        return Tokenized(self.input_ids[index], self.labels[index])


class _PackedRows(_View):
    """Packed rows: row ``r`` holds the examples ``order[row_offsets[r]:row_offsets[r + 1]]``."""

    def __init__(self, examples: _Examples, order: np.ndarray, row_offsets: np.ndarray) -> None:
        self.examples, self.order, self.row_offsets = examples, order, row_offsets

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def _get(self, index: int) -> list[Tokenized]:
        return [self.examples[int(i)] for i in self.order[self.row_offsets[index]: self.row_offsets[index + 1]]]


class _SingleRows(_View):
    """One example per row (``data.packing=false``), in the order they were read."""

    def __init__(self, examples: _Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def _get(self, index: int) -> list[Tokenized]:
        return [self.examples[index]]


def _item_encode(item: Item) -> list[Any]:
    """An item for the token cache's key: its messages (or tokens), where it was read, tools and train flags."""
    content, where, tools, learn = item
    body = [content.input_ids, content.labels] if isinstance(content, Tokenized) else content
    return [body, where, tools, learn]


def _item_key(item: Item) -> str:
    """What makes two parsed records the same example: their messages (or tokens) and tools."""
    content, _, tools, learn = item
    body = [content.input_ids, content.labels] if isinstance(content, Tokenized) else content
    return json.dumps([body, tools, learn], sort_keys=True, default=str)


def _ints(value: Any, field: str, record: Record) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise DataError(f"field '{field}' must be a list of integers", source=record.source, location=record.location)
    return value


def pretokenized(record: Record) -> Tokenized:
    """A pre-tokenised record as it is: its ``labels`` (else every token learned), its padding
    (``attention_mask`` 0 at either end) taken off, as the collator pads again.

    Labels must be the input ids, unshifted, with ``-100`` where nothing is learned (the model
    shifts them): labels shifted already would silently train each token to predict itself."""
    data = record.data
    ids = _ints(data["input_ids"], "input_ids", record)
    labels = _ints(data["labels"], "labels", record) if data.get("labels") is not None else list(ids)
    mask = _ints(data["attention_mask"], "attention_mask", record) if data.get("attention_mask") is not None \
        else [1] * len(ids)
    if not (len(ids) == len(labels) == len(mask)) or not ids:
        raise DataError(f"input_ids ({len(ids)}), labels ({len(labels)}) and attention_mask ({len(mask)}) must be "
                        "non-empty and of one length", source=record.source, location=record.location)
    if any(label != IGNORE and label != token for token, label in zip(ids, labels)):
        raise DataError("labels must equal input_ids where learned and -100 elsewhere (unshifted: the model shifts "
                        "them)", source=record.source, location=record.location)
    kept = [i for i, m in enumerate(mask) if m]
    if not kept or kept != list(range(kept[0], kept[-1] + 1)):
        raise DataError("attention_mask must be 1 on one run of tokens (padding only at the ends)",
                        source=record.source, location=record.location)
    return Tokenized(ids[kept[0]: kept[-1] + 1], labels[kept[0]: kept[-1] + 1])
