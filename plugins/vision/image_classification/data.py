"""image_classification data: image folders, (image, label) manifests, or webdataset shards.

Sources, by what ``data.train`` names:
- a folder whose sub-folders are classes (torchvision ``ImageFolder`` layout);
- ``jsonl`` / ``csv`` / ``parquet`` manifests with an image path (relative to the
  manifest) and a label (class name or index);
- webdataset shards with an image (``jpg``/``png``...) and a ``cls`` entry.
Unreadable images stop the run naming the file, or, with ``data.skip_bad=true``,
are checked up front, skipped, counted and reported.

Empty values / truncated media / duplicates / mixed types: a blank image path or label is an error
naming file and line (a blank path would resolve to the manifest's folder). A cut or unreadable
image is found by the header pass (``data.verify``) or when opened, and stops the run naming the
file (``data.skip_bad=true``: skipped, counted). An image listed twice is normal in a
classification set (oversampling, copies): kept, counted in one warning; the same image with two
different labels is an error naming both lines. Labels are text: ``1`` and ``"1"`` are one class
(``"01"`` another); a boolean or a float label is an error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.workers import Workers
from modalforge.data.images import ImageRef, image_from_sample, image_problem, open_image, resolve_image_path
from modalforge.data.duplicates import refuse_conflicts, report_repeats
from modalforge.data.readers import Record, label_text, read_records, require_text
from modalforge.data.synthetic.shapes import write_shapes
from modalforge.data.verify import verify_media
from modalforge.plugins.vision.image_classification.transforms import build_batch_mixer, build_transform

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _is_image_folder(spec: Any) -> bool:
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(spec):
        return False
    subdirs = [p for p in Path(spec).iterdir() if p.is_dir()]
    return bool(subdirs) and any(f.suffix.lower() in IMAGE_SUFFIXES for d in subdirs for f in d.iterdir())


def _refuse_flat_folder(spec: Any, what: str) -> None:
    """A folder of images with no class sub-folders: say so and show the layout, not "no .jsonl file"."""
    if not isinstance(spec, (str, os.PathLike)) or not os.path.isdir(spec):
        return
    images = [p.name for p in sorted(Path(spec).iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if images:
        raise DataError(f"{len(images)} images found (first: {images[0]}) but no class sub-folders: "
                        "the class of an image is the name of the folder it is in", source=str(spec),
                        hint=f"lay it out as {Path(spec).name}/<class>/<image> (e.g. {Path(spec).name}/cat/1.png, "
                             f"{Path(spec).name}/dog/2.png), or give {what} a jsonl/csv manifest of image and label")


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


class ImageClassificationDataModule(SourcedDataModule):
    """Reads labelled images and serves normalised tensors.

    Args:
        train: image folder, manifest(s), shards, or a weighted mixture of them; ``None`` generates the
            coloured-shapes demo set.
        val: same kinds (one set or named sets); ``None`` holds out ``val_fraction`` of ``train``.
        image_field: manifest field with the image path. label_field: manifest field with the label.
        image_size: square input size. augment: ``standard`` or ``none``.
        mean, std: normalisation (ImageNet's by default).
        mixup_alpha, cutmix_alpha: batch mixing (0 disables); labels become soft.
        skip_bad: skip unreadable images (counted and reported) instead of failing.
        verify: check every image's header before training (``null``: when the set is small enough
            to be cheap); a bad one stops the run naming it.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    decodes_per_item = True  # each item opens and decodes a file: num_workers=auto uses workers

    def __init__(self, train: Any = None, val: Any = None, image_field: str = "image", label_field: str = "label",
                 image_size: int = 32, augment: Literal["standard", "none"] = "standard",
                 mean: tuple = (0.485, 0.456, 0.406), std: tuple = (0.229, 0.224, 0.225), mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, skip_bad: bool = False, verify: bool | None = None, batch_size: int = 64,
                 num_workers: Workers = "auto", val_fraction: float = 0.1, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        self.image_field, self.label_field = image_field, label_field
        self.image_size, self.augment, self.mean, self.std = image_size, augment, tuple(mean), tuple(std)
        self.mixup_alpha, self.cutmix_alpha, self.skip_bad, self.verify = mixup_alpha, cutmix_alpha, skip_bad, verify
        self.classes: list[str] = []
        self.skipped: list[str] = []

    # ---- reading ----------------------------------------------------------------------
    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "shapes-v1", write_shapes)
        return str(folder / "train.jsonl"), str(folder / "val.jsonl")

    def read(self, spec: Any, what: str) -> list[tuple[ImageRef, str]]:
        items: list[tuple[ImageRef, str]] = []
        if _is_image_folder(spec):
            for class_dir in sorted(p for p in Path(spec).iterdir() if p.is_dir()):
                for file in sorted(class_dir.rglob("*")):
                    if file.suffix.lower() in IMAGE_SUFFIXES:
                        items.append((ImageRef(path=str(file)), class_dir.name))
        else:
            _refuse_flat_folder(spec, what)
            items = [self.parse(record) for record in read_records(spec, what=what)]
        if not items:
            raise DataError(f"{what}: no images found in {spec!r}")
        refuse_conflicts(((ref.path, label, ref.where) for ref, label in items if ref.path is not None),
                         key_name="image", value_name="label", hint="give each image one label")
        report_repeats(((ref.path, ref.where) for ref, _ in items if ref.path is not None), what=what, kind="image",
                       note="normal in a classification set: each copy is trained")
        checked = verify_media(items, lambda item: image_problem(item[0]), lambda item: item[0].describe(),
                               what=what, verify=self.verify, skip_bad=self.skip_bad, kind="image")
        kept = {id(item) for item in checked}
        self.skipped += [item[0].describe() for item in items if id(item) not in kept]
        return checked

    def parse(self, record: Record) -> tuple[ImageRef, str]:
        if record.source.endswith(".tar"):
            ref = image_from_sample(record.data, record.where())
            label = label_text(Record({"cls": record.data.get("cls", record.data.get(self.label_field))},
                                      record.source, record.location), "cls", required=False)
            if ref is None or label is None:
                raise DataError("shard sample needs an image (jpg/png/...) and a 'cls' label; keys present: "
                                f"{sorted(k for k in record.data if not k.startswith('__'))}",
                                source=record.source, location=record.location)
        else:
            path = require_text(record, self.image_field, "an image path")
            label = label_text(record, self.label_field, required=True)
            ref = ImageRef(path=resolve_image_path(path, record.source), where=record.where())
        return ref, label

    def fit(self, train_items: list[tuple[ImageRef, str]]) -> None:
        self.classes = sorted({label for _, label in train_items}, key=_label_key)
        self.processor = None

    def build(self, items: list[tuple[ImageRef, str]], what: str) -> LabelledImages:
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [(ref, label) for ref, label in items if label not in index]
        if unknown:
            ref, label = unknown[0]
            raise DataError(f"label {label!r} does not occur in the training data (classes: {self.classes[:20]})",
                            source=ref.describe())
        train = what.startswith("data.train")
        log.info("image_classification %s: %d images, %d classes", what, len(items), len(self.classes))
        return LabelledImages([(r, index[l]) for r, l in items],
                              build_transform(self.image_size, train, self.augment, self.mean, self.std))

    # ---- batches ----------------------------------------------------------------------
    def collate(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        images = torch.stack([x for x, _ in items])
        labels = torch.tensor([y for _, y in items])
        batch = {"images": images, "labels": labels}
        mixer = build_batch_mixer(len(self.classes), self.mixup_alpha, self.cutmix_alpha)
        if mixer is not None:
            batch["images"], batch["targets"] = mixer(images, labels)
        return batch

    def collate_eval(self, items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        return {"images": torch.stack([x for x, _ in items]), "labels": torch.tensor([y for _, y in items])}

    _collate_train, _collate_eval = collate, collate_eval

    # ---- for the objective ------------------------------------------------------------
    def model_hints(self) -> dict[str, Any]:
        return {"num_classes": len(self.classes), "image_size": self.image_size}

    def sample_inputs(self, n: int) -> list[tuple[torch.Tensor, str, str]]:
        """A few validation images as (tensor, true class, file) for prediction samples."""
        val_set = self.val_set
        picks = range(0, len(val_set), max(1, len(val_set) // max(n, 1)))
        out = []
        for i in list(picks)[:n]:
            image, label = val_set[i]
            out.append((image, self.classes[label], val_set.items[i][0].describe()))
        return out
