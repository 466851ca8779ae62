"""clip data: (image, caption) pairs from manifests or webdataset shards, open_clip preprocessing.

Sources: ``jsonl``/``csv``/``parquet`` manifests (image path relative to the manifest,
caption, optional label for zero-shot evaluation), or LAION/DataComp-style shards
(``jpg``/``png`` + ``txt``), read up front or, with ``data.streaming=true``, streamed
and split by node and dataloader worker. Images go through open_clip's own
transforms and captions through its tokenizer.

Empty values / truncated media / duplicates / mixed types: a blank caption or image path is an
error naming file and line (an empty caption would be trained as a match for its image); a blank
or ``null`` label is "no label" (a CSV's empty cell). A cut or unreadable image is found by the
header pass (``data.verify``) or when opened, and stops the run naming the file
(``data.skip_bad=true``: skipped, counted). One image with several captions is normal (COCO has
five); the same image-caption pair twice is kept and counted in one warning. A caption that is
not a string is an error; labels may be strings or integers (``1`` and ``"1"`` are one class).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.images import ImageRef, image_from_sample, image_problem, open_image, resolve_image_path
from modalforge.data.duplicates import report_repeats
from modalforge.data.readers import Record, label_text, read_records, require_text
from modalforge.data.shards import webdataset_stream
from modalforge.data.synthetic.shapes import write_shapes
from modalforge.data.verify import verify_media
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.workers import Workers
from modalforge.data.mixture import MixedStream
from modalforge.errors import ConfigError

CAPTION_KEYS = ("txt", "caption", "text")
log = logging.getLogger(__name__)


class Pair:
    """One image reference with its caption, optional class label, and where it was read."""

    __slots__ = ("image", "caption", "label", "source", "location")

    def __init__(self, image: ImageRef, caption: str, label: str | None, source: str = "", location: str = "") -> None:
        self.image, self.caption, self.label = image, caption, label
        self.source, self.location = source, location


def _as_int(label: str) -> int | None:
    try:
        return int(label)
    except ValueError:
        return None


def class_indices(pairs: list[Pair], classnames: list[str], *, strict: bool, label_field: str = "label") -> list[int]:
    """Each pair's index into ``classnames`` (-1 for a pair without a label).

    A label is matched by name when every label is one of ``classnames``; otherwise, when every
    label is an integer, it is read as an index into ``classnames`` (``data.classnames=[airplane,
    car, ...]`` for integer labels 0, 1, ...). With ``strict``, a label that matches neither way is a
    ``DataError`` naming its record: zero-shot accuracy is never silently lost.
    """
    by_name = {name: i for i, name in enumerate(classnames)}
    labels = [p.label for p in pairs if p.label is not None]
    by_index = not all(label in by_name for label in labels) and all(_as_int(label) is not None for label in labels)
    indices = []
    for pair in pairs:
        if pair.label is None:
            indices.append(-1)
            continue
        index = _as_int(pair.label) if by_index else by_name.get(pair.label, -1)
        if not 0 <= index < len(classnames):
            if strict:
                shown = ", ".join(repr(n) for n in classnames[:5]) + (", ..." if len(classnames) > 5 else "")
                how = (f" and is not an index into them (0..{len(classnames) - 1})" if by_index else
                       f"; labels are matched by name, or as indices 0..{len(classnames) - 1} when all are integers")
                raise DataError(f"{label_field}={pair.label!r} matches no name in data.classnames "
                                f"({len(classnames)} names: {shown}){how}",
                                source=pair.source or None, location=pair.location or None)
            index = -1
        indices.append(index)
    return indices


class PairDataset(Dataset):
    """``(image tensor, caption tokens, label index or -1)``.

    Args:
        pairs / transform / tokenizer: the records and their preprocessing.
        classes: zero-shot class names. strict: an unmatched label is an error (validation) or -1 (training).
    """

    def __init__(self, pairs: list[Pair], transform: Any, tokenizer: Any, classes: list[str], strict: bool = False,
                 label_field: str = "label") -> None:
        self.pairs, self.transform, self.tokenizer = pairs, transform, tokenizer
        self.labels = class_indices(pairs, classes, strict=strict, label_field=label_field)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        pair = self.pairs[index]
        tokens = self.tokenizer([pair.caption])[0]
        return self.transform(open_image(pair.image)), tokens, self.labels[index]


class StreamingPairs(IterableDataset):
    """Pairs streamed from shards; every rank and worker reads its own shards."""

    def __init__(self, urls: Any, transform: Any, tokenizer: Any, shuffle: int, seed: int) -> None:
        super().__init__()
        self.urls, self.transform, self.tokenizer, self.shuffle, self.seed = urls, transform, tokenizer, shuffle, seed

    def __iter__(self):  # noqa: ANN204
        for record in webdataset_stream(self.urls, shuffle=self.shuffle, seed=self.seed):
            pair = pair_from_record(record, "image", "caption", "label")
            yield self.transform(open_image(pair.image)), self.tokenizer([pair.caption])[0], -1


def pair_from_record(record: Record, image_field: str, caption_field: str, label_field: str) -> Pair:
    """A ``Pair`` from a manifest row or a shard sample, or a ``DataError`` saying what is missing."""
    if record.source.endswith(".tar"):
        ref = image_from_sample(record.data, record.where())
        key = next((k for k in CAPTION_KEYS if isinstance(record.data.get(k), str)), None)
        if ref is None or key is None:
            raise DataError("shard sample needs an image (jpg/png/...) and a caption (txt); keys present: "
                            f"{sorted(k for k in record.data if not k.startswith('__'))}",
                            source=record.source, location=record.location)
        return Pair(ref, require_text(record, key, "a caption"), label_text(record, "cls", required=False),
                    record.source, record.location)
    path = require_text(record, image_field, "an image path")
    ref = ImageRef(path=resolve_image_path(path, record.source), where=record.where())
    return Pair(ref, require_text(record, caption_field, "a caption"), label_text(record, label_field, required=False),
                record.source, record.location)


def collate(items: list[tuple[torch.Tensor, torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    return {"images": torch.stack([i for i, _, _ in items]), "texts": torch.stack([t for _, t, _ in items]),
            "labels": torch.tensor([l for _, _, l in items])}


class CLIPDataModule(SourcedDataModule):
    """Image-caption pairs for contrastive training.

    Args:
        train / val: manifests or shards, or a weighted mixture of sources (val: one or named sets); ``None``
            generates the shapes-with-captions demo set.
        image_field / caption_field / label_field: manifest fields (label optional; enables zero-shot).
        image_size: model input size. mean / std: normalisation (OpenAI CLIP's by default).
        augment: ``standard`` (open_clip's training transform: random resized crop) or ``none`` (the
            evaluation transform for training too: resize and centre crop, the same pixels on every rank
            and every epoch, for captions that name positions or a run that must equal one process).
        context_length: caption tokens. tokenizer: open_clip model name whose tokenizer to use
            (``null``: open_clip's bundled BPE, ``SimpleTokenizer``).
        classnames / templates: zero-shot classes and prompts (each with one ``{}`` for the class name).
            Labels match ``classnames`` by name, or by index when they are integers; default: the labels
            of the validation set (a warning when those are bare numbers, which make poor prompts).
        streaming / shuffle_buffer: stream training shards instead of reading them up front.
        verify: check every image's header before training (``null``: when the set is small enough to be
            cheap). skip_bad: skip unreadable images (counted and reported) instead of failing.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    decodes_per_item = True  # each item opens and decodes a file: num_workers=auto uses workers

    def __init__(self, train: Any = None, val: Any = None, image_field: str = "image", caption_field: str = "caption",
                 label_field: str = "label", image_size: int = 32, augment: Literal["standard", "none"] = "standard",
                 mean: tuple = (0.48145466, 0.4578275, 0.40821073), std: tuple = (0.26862954, 0.26130258, 0.27577711),
                 context_length: int = 16, tokenizer: str | None = None, classnames: list[str] | None = None,
                 templates: list[str] | None = None, streaming: bool = False, shuffle_buffer: int = 1000,
                 verify: bool | None = None, skip_bad: bool = False, batch_size: int = 64, num_workers: Workers = "auto", val_fraction: float = 0.1, cache_dir: str | None = None,
                 seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        if streaming and (train is None or val is None):
            raise DataError("data.streaming=true needs data.train (shards) and data.val")
        self.fields = (image_field, caption_field, label_field)
        if augment not in ("standard", "none"):
            raise ConfigError(f"{augment!r} is not one of: standard, none", where="data.augment")
        self.image_size, self.augment, self.mean, self.std = image_size, augment, tuple(mean), tuple(std)
        self.context_length, self.tokenizer_name = context_length, tokenizer
        self.classnames = list(classnames) if classnames else None
        self.templates = list(templates) if templates else ["a photo of a {}.", "a {}.", "a picture of a {}."]
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer
        self.verify, self.skip_bad = verify, skip_bad

    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "shapes-v1", write_shapes)
        return str(folder / "train.jsonl"), str(folder / "val.jsonl")

    def _synthetic(self) -> Path:
        return Path(self.synthetic_data()[0]).parent

    def parse(self, record: Record) -> Pair:
        return pair_from_record(record, *self.fields)

    def read(self, spec: Any, what: str) -> list[Pair]:
        pairs = [self.parse(r) for r in read_records(spec, what=what)]
        if not pairs:
            raise DataError(f"{what}: no image-caption pairs in {spec!r}")
        report_repeats((((p.image.path or p.image.where, p.caption), f"{p.source}, {p.location}") for p in pairs),
                       what=what, kind="image-caption pair", note="a repeated pair is a false negative in its batch")
        return verify_media(pairs, lambda p: image_problem(p.image), lambda p: p.image.describe(), what=what,
                            verify=self.verify, skip_bad=self.skip_bad, kind="image")

    def _tokenizer(self):  # noqa: ANN202
        import open_clip

        if self.tokenizer_name:
            return open_clip.get_tokenizer(self.tokenizer_name, context_length=self.context_length)
        return open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)

    def _transform(self, train: bool):  # noqa: ANN202
        import open_clip

        return open_clip.image_transform(self.image_size, is_train=train and self.augment == "standard",
                                         mean=self.mean, std=self.std)

    def fit(self, train_items: list[Pair]) -> None:
        self.processor = self._tokenizer()
        self.classnames = self._classes(self.first_val_items())

    def build(self, items: list[Pair], what: str) -> PairDataset:
        if what.startswith("data.train"):
            return PairDataset(items, self._transform(True), self.processor, self.classnames)
        return PairDataset(items, self._transform(False), self.processor, self.classnames, strict=True,
                           label_field=self.fields[2])

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return collate(items)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.streaming:
            super().setup(stage)
            return
        self.val_items = {name: self.read(spec, "data.val") for name, spec in self.val_specs.items()}
        self.fit([])
        streams = [StreamingPairs(source.spec, self._transform(True), self.processor, self.shuffle_buffer, self.seed)
                   for source in self.sources]
        self.train_set = streams[0] if len(streams) == 1 else MixedStream(
            streams, [s.weight for s in self.sources], [s.name for s in self.sources], seed=self.seed)
        self.val_sets = {name: self.build(items, "data.val") for name, items in self.val_items.items()}

    def _classes(self, val: list[Pair]) -> list[str]:
        """The zero-shot class names: ``data.classnames``, else the validation labels (checked either way)."""
        labels = {p.label for p in val if p.label is not None}
        for template in self.templates:
            if template.count("{}") != 1:
                raise DataError(f"data.templates: {template!r} needs exactly one '{{}}' where the class name goes")
        if self.classnames is not None:
            if not labels:
                raise DataError(f"data.classnames is set but no validation record has a label "
                                f"(data.label_field={self.fields[2]!r}; shards: a 'cls' entry), so zero-shot "
                                f"accuracy cannot be measured; set data.label_field or data.classnames=null")
            return self.classnames
        numeric = bool(labels) and all(_as_int(label) is not None for label in labels)
        if numeric:
            log.warning("data.classnames is not set and the validation labels are bare numbers (%s): zero-shot "
                        "prompts will read %r; set data.classnames=[name0,name1,...] (label i -> the i-th name)",
                        ", ".join(sorted(labels, key=int)[:5]) + (", ..." if len(labels) > 5 else ""),
                        self.templates[0].format(min(labels, key=int)))
            return sorted(labels, key=int)
        return sorted(labels)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        if self.streaming:
            return DataLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                              collate_fn=collate, drop_last=True)
        return super().train_dataloader()

    def model_hints(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "context_length": self.context_length,
                "classnames": list(self.classnames or []), "templates": list(self.templates)}

    def save_processor(self, directory: str | Path) -> None:
        import json

        config = {"tokenizer": self.tokenizer_name or "open_clip.SimpleTokenizer", "context_length": self.context_length,
                  "image_size": self.image_size, "mean": self.mean, "std": self.std, "classnames": self.classnames,
                  "templates": self.templates}
        Path(directory, "preprocess_config.json").write_text(json.dumps(config, indent=2))
        model_config = Path(directory, "open_clip_config.json")
        if model_config.exists():  # open_clip's loader takes its transforms from preprocess_cfg
            saved = json.loads(model_config.read_text())
            saved["preprocess_cfg"] = {"size": self.image_size, "mean": list(self.mean), "std": list(self.std)}
            model_config.write_text(json.dumps(saved, indent=2, default=str))

    def sample_inputs(self, n: int) -> list[tuple[torch.Tensor, str]]:
        """A few validation images with their true captions."""
        val_set = self.val_set
        step = max(1, len(val_set) // max(n, 1))
        return [(val_set[i][0], val_set.pairs[i].caption) for i in range(0, len(val_set), step)][:n]
