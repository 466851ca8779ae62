"""The shape every map-style DataModule shares, once: sources -> records -> examples -> batches.

A plugin's DataModule subclasses :class:`SourcedDataModule` and writes only what is
its own:

- ``synthetic_data()``: the (train, val) files of its offline demo set, generated on first use;
- ``parse(record)``: check one record and turn it into an item (or override ``read`` for
  sources that are not record files, such as class folders);
- ``fit(train_items)``: build what is learned from the training data (a tokenizer);
- ``build(items, what)``: the items of one source or split as a ``Dataset`` (tokenised, packed);
- ``collate(examples)`` (and ``collate_eval``): a batch.

The base does the rest for every plugin, built-in or third party: the synthetic default
or ``data.train``; a weighted mixture when ``data.train`` lists sources
(:mod:`modalforge.data.sources`); ``data.val`` as one or several named sets, or a
deterministic split of each training source; resumable, rank-sharded loaders; too
little data for one batch as an error with both numbers; per-source counts for logging.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from torch.utils.data import Dataset, default_collate

from modalforge.data.errors import DataError
from modalforge.data.loader import ResumableDataLoader
from modalforge.data.mixture import MixedDataset
from modalforge.data.readers import Record, read_records
from modalforge.data.sources import Source, describe, parse_train, parse_val
from modalforge.data.splits import split_train_val
from modalforge.data.workers import Workers, resolve_workers
from modalforge.interfaces import DataModule

log = logging.getLogger(__name__)


class ListDataset(Dataset):
    """Items in a list (the default ``build``)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class SourcedDataModule(DataModule):
    """Base of map-style DataModules; see the module docstring for what a plugin writes.

    Args:
        train: one source (path, glob, folder, shards, ``hf:``, or a list of them) or a weighted
            mixture (a list of ``{path, weight, name}``); ``None`` uses the plugin's synthetic data.
        val: one set, or named sets (``{name: spec}``); ``None`` splits ``val_fraction`` off each source.
        batch_size: examples per batch (per device).
        num_workers: dataloader worker processes, or ``auto`` (follows the cores and whether items are
            decoded per item: :mod:`modalforge.data.workers`).
        val_fraction: share held out when ``val`` is not given.
        cache_dir: where generated demo data and trained tokenizers are kept.
        seed: shuffling, mixing and splitting seed.
    """

    #: Drop the last incomplete training batch (steady shapes; set False where that loses too much).
    drop_last_train: bool = True
    #: Drop the last incomplete validation batch (objectives that need full batches).
    drop_last_val: bool = False
    #: Items are decoded from files in ``__getitem__`` (images, audio): ``num_workers=auto`` then uses workers.
    decodes_per_item: bool = False
    #: Keyword arguments of ``split_train_val`` (``min_val``, ``max_val``) for the held-out split.
    split_options: dict[str, Any] = {}
    #: Keys a mixture source may carry besides path/weight/name (``Source.options``; ``source_for`` finds them).
    source_options: tuple[str, ...] = ()

    def __init__(self, train: Any = None, val: Any = None, *, batch_size: int = 8, num_workers: Workers = "auto",
                 val_fraction: float = 0.05, cache_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.train_spec, self.val_spec = train, val
        self.sources: list[Source] = parse_train(train, options=self.source_options)
        self.val_specs: dict[str, Any] = parse_val(val)
        self.batch_size, self.val_fraction = batch_size, val_fraction
        self.num_workers_option: Workers = num_workers
        self._workers: int | None = None
        self.cache_dir, self.seed = cache_dir, seed
        self.train_set: Dataset | None = None
        self.val_sets: dict[str, Dataset] = {}
        self.train_items: list[Any] = []
        self.val_items: dict[str, list[Any]] = {}

    # ---- what a plugin writes ---------------------------------------------------------
    def synthetic_data(self) -> tuple[Any, Any]:
        """(train spec, val spec) of the offline demo set, generated on first use."""
        raise DataError("data.train is not set and this plugin has no synthetic default: give data.train")

    def parse(self, record: Record) -> Any:
        """Check one record and return the item it becomes (the record itself by default)."""
        return record

    def read(self, spec: Any, what: str) -> list[Any]:
        """Every item of one source; an empty source is an error naming it."""
        items = [self.parse(record) for record in read_records(spec, what=what)]
        if not items:
            raise DataError(f"{what}: no records in {spec!r}")
        return items

    def fit(self, train_items: list[Any]) -> None:
        """Build what is learned from the training data (a tokenizer, the class list) before ``build``."""

    def build(self, items: list[Any], what: str) -> Dataset:
        """The items of one source or validation set as a ``Dataset``."""
        return ListDataset(items)

    def collate(self, examples: list[Any]) -> Any:
        """A training batch."""
        return default_collate(examples)

    def collate_eval(self, examples: list[Any]) -> Any:
        """A validation batch (the training collate by default)."""
        return self.collate(examples)

    # ---- the shared shape -------------------------------------------------------------
    def prepare_data(self) -> None:
        if not self.sources:
            self.synthetic_data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sources, val_specs = self.sources, self.val_specs
        if not sources:
            train_spec, val_spec = self.synthetic_data()
            sources = [Source(spec=train_spec)]
            val_specs = val_specs or ({"val": val_spec} if val_spec is not None else {})
        per_source = [self.read(source.spec, source.what) for source in sources]
        if val_specs:
            val_items = {name: self.read(spec, "data.val" if len(val_specs) == 1 else f"data.val.{name}")
                         for name, spec in val_specs.items()}
        else:
            held: list[Any] = []
            for i, items in enumerate(per_source):
                per_source[i], out = split_train_val(items, val_fraction=self.val_fraction, seed=self.seed,
                                                     **self.split_options)
                held += out
            val_items = {"val": held}
        self.train_items = [item for items in per_source for item in items]
        self.val_items = val_items
        self.fit(self.train_items)
        datasets = [self.build(items, source.what) for items, source in zip(per_source, sources)]
        if len(datasets) == 1:
            self.train_set = datasets[0]
        else:
            self.train_set = MixedDataset(datasets, [s.weight for s in sources], [s.name for s in sources])
            log.info("data.train: mixture of %d sources (%s), %d examples per epoch", len(sources),
                     describe(sources), len(self.train_set))
        self.val_sets = {name: self.build(items, f"data.val.{name}" if len(val_items) > 1 else "data.val")
                         for name, items in val_items.items()}

    @property
    def val_set(self) -> Dataset | None:
        """The first (or only) validation set."""
        return next(iter(self.val_sets.values()), None)

    @property
    def val_names(self) -> list[str]:
        """Names of the validation sets, in dataloader order (``val/<name>/...`` when more than one)."""
        return list(self.val_sets)

    @property
    def num_workers(self) -> int:
        """Dataloader workers per process: ``data.num_workers``, with ``auto`` resolved (and said) once."""
        if self._workers is None:
            processes = int(getattr(getattr(self, "trainer", None), "num_devices", 1) or 1)
            self._workers, why = resolve_workers(self.num_workers_option, decodes_per_item=self.decodes_per_item,
                                                 processes=processes)
            log.info("data loader: %s", why)
        return self._workers

    def source_for(self, what: str) -> Source | None:
        """The training source ``read`` was called for (by its ``what``), for its per-source options."""
        return next((s for s in self.sources if s.what == what), None)

    def first_val_items(self) -> list[Any]:
        return next(iter(self.val_items.values()), [])

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.train_set, self.batch_size, shuffle=True, seed=self.seed,
                                   collate_fn=self.collate, num_workers=self.num_workers,
                                   drop_last=self.drop_last_train, what="data.train")

    def val_dataloader(self) -> ResumableDataLoader | list[ResumableDataLoader]:
        self.setup()
        loaders = [ResumableDataLoader(dataset, self.batch_size, shuffle=False, collate_fn=self.collate_eval,
                                       num_workers=self.num_workers, drop_last=self.drop_last_val,
                                       what=f"data.val ({name})")
                   for name, dataset in self.val_sets.items()]
        return loaders[0] if len(loaders) == 1 else loaders
