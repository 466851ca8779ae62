"""image_classification data: image folders, (image, label) manifests, or webdataset shards.

Sources, by what ``data.train`` names:
- a folder whose sub-folders are classes (torchvision ``ImageFolder`` layout);
- ``jsonl`` / ``csv`` / ``parquet`` manifests with an image path (relative to the
  manifest) and a label (class name or index);
- webdataset shards with an image (``jpg``/``png``...) and a ``cls`` entry.
Unreadable images stop the run naming the file, or, with ``data.skip_bad=true``,
are checked up front, skipped, counted and reported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.images import ImageRef, image_from_sample, is_readable, open_image, resolve_image_path
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.readers import read_records, require_fields
from modalforge.data.splits import split_train_val
from modalforge.data.synthetic.shapes import write_shapes
from modalforge.interfaces import DataModule
from modalforge.plugins.vision.image_classification.transforms import build_batch_mixer, build_transform

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _is_image_folder(spec: Any) -> bool:
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(spec):
        return False
    subdirs = [p for p in Path(spec).iterdir() if p.is_dir()]
    return bool(subdirs) and any(f.suffix.lower() in IMAGE_SUFFIXES for d in subdirs for f in d.iterdir())


def _label_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


class LabelledImages(Dataset):
    """``(image tensor, class index)`` pairs; opening errors name the file."""

    def __init__(self, items: list[tuple[ImageRef, int]], transform: Any) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ref, label = self.items[index]
        return self.transform(open_image(ref)), label


class ImageClassificationDataModule(DataModule):
    """Reads labelled images and serves normalised tensors.

    Args:
        train: image folder, manifest(s), or shards; ``None`` generates the coloured-shapes demo set.
        val: same kinds; ``None`` holds out ``val_fraction`` of ``train``.
        image_field: manifest field with the image path. label_field: manifest field with the label.
        image_size: square input size. augment: ``standard`` or ``none``.
        mean, std: normalisation (ImageNet's by default).
        mixup_alpha, cutmix_alpha: batch mixing (0 disables); labels become soft.
        skip_bad: check images up front and skip unreadable ones (counted and reported) instead of failing.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    def __init__(self, train: Any = None, val: Any = None, image_field: str = "image", label_field: str = "label",
                 image_size: int = 32, augment: str = "standard", mean: tuple = (0.485, 0.456, 0.406),
                 std: tuple = (0.229, 0.224, 0.225), mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 skip_bad: bool = False, batch_size: int = 64, num_workers: int = 0, val_fraction: float = 0.1,
                 cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.train_spec, self.val_spec = train, val
        self.image_field, self.label_field = image_field, label_field
        self.image_size, self.augment, self.mean, self.std = image_size, augment, tuple(mean), tuple(std)
        self.mixup_alpha, self.cutmix_alpha, self.skip_bad = mixup_alpha, cutmix_alpha, skip_bad
        self.batch_size, self.num_workers, self.val_fraction = batch_size, num_workers, val_fraction
        self.cache_dir, self.seed = cache_dir, seed
        self.classes: list[str] = []
        self.skipped: list[str] = []
        self.train_set: LabelledImages | None = None
        self.val_set: LabelledImages | None = None

    # ---- reading ----------------------------------------------------------------------
    def _synthetic(self) -> Path:
        return ensure_built(cache_root(self.cache_dir) / "synthetic" / "shapes-v1", write_shapes)

    def prepare_data(self) -> None:
        if self.train_spec is None:
            self._synthetic()

    def _collect(self, spec: Any, what: str) -> list[tuple[ImageRef, str]]:
        items: list[tuple[ImageRef, str]] = []
        if _is_image_folder(spec):
            for class_dir in sorted(p for p in Path(spec).iterdir() if p.is_dir()):
                for file in sorted(class_dir.rglob("*")):
                    if file.suffix.lower() in IMAGE_SUFFIXES:
                        items.append((ImageRef(path=str(file)), class_dir.name))
        else:
            for record in read_records(spec, what=what):
                if record.source.endswith(".tar"):
                    ref = image_from_sample(record.data, record.where())
                    label = record.data.get("cls", record.data.get(self.label_field))
                    if ref is None or label is None:
                        raise DataError("shard sample needs an image (jpg/png/...) and a 'cls' label; keys present: "
                                        f"{sorted(k for k in record.data if not k.startswith('__'))}",
                                        source=record.source, location=record.location)
                else:
                    require_fields(record, {self.image_field: str, self.label_field: (str, int)})
                    ref = ImageRef(path=resolve_image_path(record.data[self.image_field], record.source),
                                   where=record.where())
                    label = record.data[self.label_field]
                items.append((ref, str(label).strip()))
        if not items:
            raise DataError(f"{what}: no images found in {spec!r}")
        if self.skip_bad:
            good, bad = [], []
            for ref, label in items:
                if is_readable(ref):
                    good.append((ref, label))
                else:
                    bad.append(ref.describe())
            if bad:
                self.skipped += bad
                log.warning("%s: skipped %d unreadable image(s) of %d (data.skip_bad=true), first: %s",
                            what, len(bad), len(items), bad[0])
            items = good
        return items

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.train_spec is None:
            folder = self._synthetic()
            train, val = self._collect(str(folder / "train.jsonl"), "data.train"), self._collect(
                str(folder / "val.jsonl"), "data.val")
        else:
            train = self._collect(self.train_spec, "data.train")
            if self.val_spec is not None:
                val = self._collect(self.val_spec, "data.val")
            else:
                train, val = split_train_val(train, val_fraction=self.val_fraction, seed=self.seed)
        self.classes = sorted({label for _, label in train}, key=_label_key)
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [(ref, label) for ref, label in val if label not in index]
        if unknown:
            ref, label = unknown[0]
            raise DataError(f"label {label!r} does not occur in the training data (classes: {self.classes[:20]})",
                            source=ref.describe())
        self.train_set = LabelledImages([(r, index[l]) for r, l in train],
                                        build_transform(self.image_size, True, self.augment, self.mean, self.std))
        self.val_set = LabelledImages([(r, index[l]) for r, l in val],
                                      build_transform(self.image_size, False, self.augment, self.mean, self.std))
        self.processor = None
        log.info("image_classification: %d classes, %d train / %d val images", len(self.classes), len(train), len(val))

    # ---- loaders ----------------------------------------------------------------------
    def _collate_train(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items])
        batch = {"images": images, "labels": labels}
        mixer = build_batch_mixer(len(self.classes), self.mixup_alpha, self.cutmix_alpha)
        if mixer is not None:
            batch["images"], batch["targets"] = mixer(images, labels)
        return batch

    @staticmethod
    def _collate_eval(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        return {"images": torch.stack([x for x, _ in items]), "labels": torch.tensor([y for _, y in items])}

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.train_set, self.batch_size, shuffle=True, seed=self.seed,
                                   collate_fn=self._collate_train, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.val_set, self.batch_size, shuffle=False, collate_fn=self._collate_eval,
                                   num_workers=self.num_workers)

    # ---- for the objective ------------------------------------------------------------
    def model_hints(self) -> dict[str, Any]:
        return {"num_classes": len(self.classes), "image_size": self.image_size}

    def sample_inputs(self, n: int) -> list[tuple[torch.Tensor, str, str]]:
        """A few validation images as (tensor, true class, file) for prediction samples."""
        picks = range(0, len(self.val_set), max(1, len(self.val_set) // max(n, 1)))
        out = []
        for i in list(picks)[:n]:
            image, label = self.val_set[i]
            out.append((image, self.classes[label], self.val_set.items[i][0].describe()))
        return out
