"""diffusion data: images with optional captions and labels, as the other vision plugins read them.

Sources, by what ``data.train`` names:
- a folder of images; sub-folders are classes (torchvision ``ImageFolder`` layout), and
  an image's caption, if any, is the ``.txt`` file beside it;
- ``jsonl`` / ``csv`` / ``parquet`` manifests with an image path (relative to the
  manifest), a caption and/or a label;
- webdataset shards with an image (``jpg``/``png``...), a ``txt`` caption and/or a ``cls`` label.

Images are resized (shorter side) and centre-cropped to ``data.image_size`` and scaled to
``[-1, 1]``, the range diffusers' pipelines decode from. With ``data.cache_latents=true``
the Objective's frozen VAE encodes the training set once; the latents are cached on disk,
keyed by the data, the VAE and the resolution, and served instead of pixels.

Empty values / truncated media / duplicates / mixed types: a blank image path is an error naming
file and line; a blank caption or label (a CSV's empty cell, a blank ``.txt`` beside an image) is
"none", an error when the conditioning needs it (an empty caption is what caption dropout trains,
not a record). A cut or unreadable image is found by the header pass (``data.verify``) or when
opened, and stops the run naming the file (``data.skip_bad=true``: skipped, counted). An image
listed twice is kept and counted in one warning (several captions per image are normal); with
``conditioning=class`` the same image with two labels is an error. A caption that is not a string
is an error; labels may be strings or integers (``1`` and ``"1"`` are one class).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch.utils.data import Dataset

from modalforge.data.cache import cache_root, ensure_built
from modalforge.data.errors import DataError
from modalforge.data.images import ImageRef, image_from_sample, image_problem, open_image, resolve_image_path
from modalforge.data.datamodule import SourcedDataModule
from modalforge.data.workers import Workers
from modalforge.data.duplicates import refuse_conflicts, report_repeats
from modalforge.data.readers import Record, label_text, optional_text, read_records, require_text
from modalforge.data.synthetic.shapes import write_shapes
from modalforge.data.verify import verify_media
from modalforge.progress import preparing

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("txt", "caption", "text")
Conditioning = Literal["none", "class", "text"]


class Item:
    """One training image with its caption and class name (either may be ``None``)."""

    __slots__ = ("image", "caption", "label")

    def __init__(self, image: ImageRef, caption: str | None, label: str | None) -> None:
        self.image, self.caption, self.label = image, caption, label


def _label_key(label: str) -> tuple[int, Any]:
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def build_transform(image_size: int, random_flip: bool) -> Callable:
    """Resize + centre crop to ``image_size``, optional horizontal flip, scale to ``[-1, 1]``."""
    from torchvision.transforms import v2

    steps = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if random_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])]
    return v2.Compose(steps)


class ImageItems(Dataset):
    """``(image tensor in [-1, 1], caption, label index)``; opening errors name the file."""

    def __init__(self, items: list[Item], transform: Callable, class_index: dict[str, int]) -> None:
        self.items, self.transform, self.class_index = items, transform, class_index

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        item = self.items[index]
        return (self.transform(open_image(item.image)), item.caption or "",
                self.class_index.get(item.label, -1) if item.label is not None else -1)


class LatentItems(Dataset):
    """The same items served as cached VAE latents."""

    def __init__(self, latents: torch.Tensor, images: ImageItems) -> None:
        self.latents, self.images = latents, images

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        item = self.images.items[index]
        label = self.images.class_index.get(item.label, -1) if item.label is not None else -1
        return self.latents[index], item.caption or "", label


class DiffusionDataModule(SourcedDataModule):
    """Images (+ captions, + labels) for denoising training.

    Args:
        train: image folder, manifest(s), shards, or a weighted mixture of them; ``None`` generates the
            coloured-shapes demo set.
        val: same kinds (one set or named sets); ``None`` holds out ``val_fraction`` of ``train``.
        image_field / caption_field / label_field: manifest fields (image path relative to the manifest).
        conditioning: what the Objective conditions on (set from ``objective.conditioning.kind``): ``class``
            needs a label on every record, ``text`` a caption.
        image_size: square training resolution; images of other sizes are resized and centre-cropped.
        random_flip: random horizontal flips (off by default: the demo's captions say "left"/"right").
        tokenizer: a tokenizer folder or hub id for captions; ``None`` uses the model's own
            (``model.name_or_path``) or trains a byte-level BPE on the captions.
        context_length: caption tokens (padded / truncated).
        tokenizer_vocab_size: vocabulary of the BPE trained when there is no tokenizer.
        cache_latents: encode the training set once with the frozen VAE and serve the latents.
        verify: check every image's header before training (``null``: when the set is small enough to be
            cheap). skip_bad: skip unreadable images (counted and reported) instead of failing.
        batch_size, num_workers, val_fraction, cache_dir, seed: as usual.
    """

    decodes_per_item = True  # each item opens and decodes a file: num_workers=auto uses workers

    def __init__(self, train: Any = None, val: Any = None, image_field: str = "image", caption_field: str = "caption",
                 label_field: str = "label", conditioning: Conditioning = "class", image_size: int = 32,
                 random_flip: bool = False, tokenizer: str | None = None,
                 context_length: int = 16, tokenizer_vocab_size: int = 400, cache_latents: bool = False,
                 verify: bool | None = None, skip_bad: bool = False, batch_size: int = 32, num_workers: Workers = "auto", val_fraction: float = 0.1,
                 cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__(train, val, batch_size=batch_size, num_workers=num_workers, val_fraction=val_fraction,
                         cache_dir=cache_dir, seed=seed)
        self.image_field, self.caption_field, self.label_field = image_field, caption_field, label_field
        self.conditioning, self.image_size, self.random_flip = conditioning, int(image_size), random_flip
        self.tokenizer_name, self.context_length = tokenizer, context_length
        self.tokenizer_vocab_size, self.cache_latents = tokenizer_vocab_size, cache_latents
        self.decodes_per_item = not cache_latents  # cached latents are served from memory
        self.verify, self.skip_bad = verify, skip_bad
        self.classes: list[str] = []

    # ---- reading ----------------------------------------------------------------------
    def synthetic_data(self) -> tuple[str, str]:
        folder = ensure_built(cache_root(self.cache_dir) / "synthetic" / "shapes-v1", write_shapes)
        return str(folder / "train.jsonl"), str(folder / "val.jsonl")

    def _synthetic(self) -> Path:
        return Path(self.synthetic_data()[0]).parent

    def parse(self, record: Record) -> Item:
        """An ``Item`` from a manifest row or a shard sample, or a ``DataError`` saying what is missing."""
        needs = {"class": self.label_field, "text": self.caption_field}.get(self.conditioning)
        if record.source.endswith(".tar"):
            ref = image_from_sample(record.data, record.where())
            caption = next((record.data[k].strip() or None for k in CAPTION_KEYS
                            if isinstance(record.data.get(k), str)), None)
            label = label_text(Record({"cls": record.data.get("cls", record.data.get(self.label_field))},
                                      record.source, record.location), "cls", required=False)
            missing = [what for what, absent in (("an image (jpg/png/...)", ref is None),
                                                 ("a caption (txt)", needs == self.caption_field and caption is None),
                                                 ("a 'cls' label", needs == self.label_field and label is None))
                       if absent]
            if missing:
                raise DataError(f"shard sample needs {' and '.join(missing)} for conditioning={self.conditioning}; "
                                f"keys present: {sorted(k for k in record.data if not k.startswith('__'))}",
                                source=record.source, location=record.location)
            return Item(ref, caption, label)
        path = require_text(record, self.image_field, "an image path")
        ref = ImageRef(path=resolve_image_path(path, record.source), where=record.where())
        caption = (require_text(record, self.caption_field, "a caption") if needs == self.caption_field
                   else optional_text(record, self.caption_field))
        return Item(ref, caption, label_text(record, self.label_field, required=needs == self.label_field))

    def _folder_items(self, folder: Path, what: str) -> list[Item]:
        items = []
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            caption_file = file.with_suffix(".txt")
            caption = (caption_file.read_text(encoding="utf-8").strip() or None) if caption_file.exists() else None
            label = file.parent.name if file.parent != folder else None
            if self.conditioning == "text" and caption is None:
                raise DataError(f"{what}: conditioning=text needs a caption file beside each image "
                                f"({caption_file.name} is {'blank' if caption_file.exists() else 'missing'})",
                                source=str(file))
            if self.conditioning == "class" and label is None:
                raise DataError(f"{what}: conditioning=class needs class sub-folders; this image lies at the "
                                "top of the folder", source=str(file))
            items.append(Item(ImageRef(path=str(file)), caption, label))
        return items

    def read(self, spec: Any, what: str) -> list[Item]:
        """Every item of a folder, manifest(s) or shards."""
        if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec) and not Path(spec, "dataset_info.json").exists():
            items = self._folder_items(Path(spec), what)
        else:
            items = [self.parse(record) for record in read_records(spec, what=what)]
        if not items:
            raise DataError(f"{what}: no images found in {spec!r}")
        if self.conditioning == "class":
            refuse_conflicts(((it.image.path, it.label, it.image.where or it.image.path) for it in items
                              if it.image.path is not None), key_name="image", value_name="label",
                             hint="give each image one label")
        report_repeats((((it.image.path or it.image.where, it.caption), it.image.where or it.image.describe())
                        for it in items), what=what, kind="image (with the same caption)",
                       note="each copy is trained; several captions per image are normal")
        return verify_media(items, lambda item: image_problem(item.image), lambda item: item.image.describe(),
                            what=what, verify=self.verify, skip_bad=self.skip_bad, kind="image")

    # ---- setup ------------------------------------------------------------------------
    def fit(self, train: list[Item]) -> None:
        if self.conditioning == "class":
            self.classes = sorted({item.label for item in train}, key=_label_key)
        if self.conditioning == "text":
            self.processor = self._tokenizer([item.caption or "" for item in train])

    def build(self, items: list[Item], what: str) -> ImageItems:
        if self.conditioning == "class":
            unknown = next((item for item in items if item.label not in self.classes), None)
            if unknown is not None:
                raise DataError(f"label {unknown.label!r} does not occur in the training data "
                                f"(classes: {self.classes[:20]})", source=unknown.image.describe())
        index = {name: i for i, name in enumerate(self.classes)}
        train = what.startswith("data.train")
        log.info("diffusion %s: %d images, conditioning=%s%s", what, len(items), self.conditioning,
                 f", {len(self.classes)} classes" if self.classes else "")
        return ImageItems(items, build_transform(self.image_size, self.random_flip and train), index)

    def _tokenizer(self, captions: list[str]) -> Any:
        from modalforge.data.tokenizers import cached_bpe, load_tokenizer

        if self.tokenizer_name:
            return load_tokenizer(self.tokenizer_name)
        return cached_bpe(captions, self.tokenizer_vocab_size, cache_dir=self.cache_dir)

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Use the pretrained pipeline's own tokenizer (called by the Objective when it loads one)."""
        if self.tokenizer_name is None and tokenizer is not None:
            self.processor = tokenizer

    # ---- latent cache -----------------------------------------------------------------
    def latent_cache_key(self, encoder_key: str) -> str:
        """Digest of the training images (paths, sizes, mtimes), the resolution and the encoder."""
        digest = hashlib.sha256(f"{encoder_key}|{self.image_size}".encode())
        for item in self.train_set.images.items if isinstance(self.train_set, LatentItems) else self.train_set.items:
            digest.update(item.image.describe().encode())
            if item.image.path is not None and os.path.exists(item.image.path):
                stat = os.stat(item.image.path)
                digest.update(f"{stat.st_size}|{stat.st_mtime_ns}".encode())
            elif item.image.data is not None:
                digest.update(hashlib.sha256(item.image.data).digest())
        return digest.hexdigest()[:20]

    def attach_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], encoder_key: str,
                       batch_size: int = 32) -> Path | None:
        """Encode the training set once with ``encode`` (the frozen VAE) and serve latents from now on.

        Does nothing unless ``data.cache_latents=true``. The file lives in the cache, keyed by
        :meth:`latent_cache_key`, so a second run (or rank) on the same data and VAE reads it back.
        """
        self.setup()
        if not self.cache_latents or isinstance(self.train_set, LatentItems):
            return None
        if not isinstance(self.train_set, ImageItems):
            raise DataError("data.cache_latents=true works on one training source; a weighted mixture is "
                            "encoded every step (drop data.cache_latents or mix the sources into one manifest)")
        if self.random_flip:
            raise DataError("data.cache_latents=true cannot be combined with data.random_flip=true "
                            "(a cached latent is one fixed view of the image)")
        images: ImageItems = self.train_set
        folder = cache_root(self.cache_dir) / "diffusion-latents" / self.latent_cache_key(encoder_key)

        def build(tmp: Path) -> None:
            chunks = []
            with preparing("diffusion: encoding the training images to latents", total=len(images), unit="image",
                           cached_in=folder.parent) as progress, torch.no_grad():
                for start in range(0, len(images), batch_size):
                    pixels = torch.stack([images[i][0] for i in range(start, min(start + batch_size, len(images)))])
                    chunks.append(encode(pixels).float().cpu())
                    progress.update(len(pixels))
                torch.save(torch.cat(chunks), tmp / "latents.pt")

        path = ensure_built(folder, build) / "latents.pt"
        self.train_set = LatentItems(torch.load(path, map_location="cpu", weights_only=True), images)
        log.info("diffusion: serving %d cached latents from %s", len(self.train_set), path)
        return path

    # ---- collation --------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Caption token ids, padded / truncated to ``context_length``."""
        out = self.processor(captions, padding="max_length", truncation=True, max_length=self.context_length,
                             return_tensors="pt")
        return out["input_ids"]

    def _collate(self, items: list[tuple[torch.Tensor, str, int]], train: bool) -> dict[str, Any]:
        """Stack images (or latents). ``objective.conditioning.caption_dropout`` is the objective's to draw:
        a generator here, in a data-loader worker or seeded alike on every rank, is not in the checkpoint,
        so a resumed run dropped other conditions than the run it continues."""
        captions = [c for _, c, _ in items]
        labels = [l for _, _, l in items]
        key = "latents" if train and isinstance(self.train_set, LatentItems) else "pixel_values"
        batch: dict[str, Any] = {key: torch.stack([x for x, _, _ in items]), "labels": torch.tensor(labels),
                                 "captions": captions}
        if self.conditioning == "text":
            batch["input_ids"] = self.tokenize(captions)
        return batch

    def collate(self, items: list) -> dict[str, Any]:
        return self._collate(items, train=True)

    def collate_eval(self, items: list) -> dict[str, Any]:
        return self._collate(items, train=False)

    _collate_train, _collate_eval = collate, collate_eval

    # ---- for the objective ------------------------------------------------------------
    def model_hints(self) -> dict[str, Any]:
        hints: dict[str, Any] = {"image_size": self.image_size, "num_classes": len(self.classes),
                                 "conditioning": self.conditioning}
        if self.conditioning == "text" and self.processor is not None:
            hints["vocab_size"] = len(self.processor)
            hints["context_length"] = self.context_length
        return hints

    def sample_inputs(self, n: int) -> list[str]:
        """Captions of a few validation images (the prompts of a text-conditional sample grid)."""
        if self.val_set is None:
            return []
        step = max(1, len(self.val_set) // max(n, 1))
        return [self.val_set.items[i].caption or "" for i in range(0, len(self.val_set), step)][:n]

    def real_images(self, n: int) -> torch.Tensor:
        """Up to ``n`` validation images in ``[0, 1]`` (the reference set of FID / KID)."""
        self.setup()
        count = min(n, len(self.val_set))
        return torch.stack([self.val_set[i][0] for i in range(count)]) * 0.5 + 0.5

    def save_processor(self, directory: str | Path) -> None:
        # The exported pipeline folder writes its own tokenizer/ sub-folder (see the Objective).
        return None
