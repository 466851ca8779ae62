"""multitask data: each task's own DataModule, and an order of task batches drawn by weight.

Every task keeps its plugin's DataModule untouched (reading, validation, tokenising,
collation); this module only decides *which task's batch comes next*. An epoch is
``steps_per_epoch`` task batches whose tasks are drawn by weight, and each task's
examples are walked in a fresh permutation; the order is a function of (seed,
epoch), so ``ResumableDataLoader`` resumes it exactly. Batches are formed here
(one item = one whole batch of one task) with each task's own ``collate_fn``.

Empty values / truncated media / duplicates / mixed types: nothing of its own; each task's
records are read, checked and counted by that task's DataModule, as its plugin documents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

from modalforge.data.loader import ResumableDataLoader
from modalforge.interfaces import DataModule
from modalforge.plugins.multimodal.multitask.tasks import Task, parse_tasks, task_config


def _first(loaders: Any) -> DataLoader:
    return loaders[0] if isinstance(loaders, (list, tuple)) else loaders


class TaskBatches(Dataset):
    """Whole batches of several tasks behind one index: ``offset[task] + k`` is the task's k-th batch.

    ``sample_order`` (called by ``ResumableSampler`` with a (seed, epoch) generator) draws the
    epoch's tasks by weight and fixes each task's permutation of examples for that epoch.
    """

    def __init__(self, loaders: dict[str, DataLoader], weights: dict[str, float], steps: int,
                 mix: Literal["sample", "sum"] = "sample") -> None:
        self.names = list(loaders)
        self.datasets = {n: loaders[n].dataset for n in self.names}
        self.collates = {n: loaders[n].collate_fn for n in self.names}
        self.batch_sizes = {n: int(loaders[n].batch_size or 1) for n in self.names}
        self.weights, self.steps, self.mix = weights, steps, mix
        self.sizes = {n: len(self.datasets[n]) for n in self.names}  # type: ignore[arg-type]
        self.perms: dict[str, list[int]] = {n: list(range(self.sizes[n])) for n in self.names}

    def __len__(self) -> int:
        return self.steps

    def _batch(self, name: str, k: int) -> Any:
        size, perm = self.batch_sizes[name], self.perms[name]
        start = (k * size) % max(1, len(perm))
        indices = [perm[(start + i) % len(perm)] for i in range(size)]
        return self.collates[name]([self.datasets[name][i] for i in indices])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.mix == "sum":
            return {"tasks": {name: self._batch(name, index) for name in self.names}}
        task, k = divmod(index, self.steps)
        name = self.names[task]
        return {"task": name, "batch": self._batch(name, k)}

    def sample_order(self, generator: torch.Generator, shuffle: bool = True) -> list[int]:
        for name in self.names:
            self.perms[name] = torch.randperm(self.sizes[name], generator=generator).tolist()
        if self.mix == "sum":
            return list(range(self.steps))
        probs = torch.tensor([self.weights[n] for n in self.names], dtype=torch.float64)
        draws = torch.multinomial(probs, self.steps, replacement=True, generator=generator).tolist()
        counters = [0] * len(self.names)
        order = []
        for task in draws:
            order.append(task * self.steps + counters[task])
            counters[task] += 1
        return order

    def count_sources(self, indices: list[int]) -> dict[str, int]:
        counts = {n: 0 for n in self.names}
        if self.mix == "sum":
            return {n: len(indices) for n in self.names}
        for index in indices:
            counts[self.names[index // self.steps]] += 1
        return counts


def _unbatch(items: list[Any]) -> Any:
    return items[0]


class _Tagged:
    """A task's collate_fn whose batches say which task they belong to."""

    def __init__(self, name: str, collate: Any) -> None:
        self.name, self.collate = name, collate

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        return {"task": self.name, "batch": self.collate(items)}


class MultiTaskDataModule(DataModule):
    """The DataModules of several plugins, served as one stream of task batches.

    Args:
        tasks: plugin names, or ``{plugin, name, weight, overrides}`` mappings.
        mix: ``sample`` (one task per step, drawn by weight) or ``sum`` (every task each step).
        steps_per_epoch: task batches per epoch.
        seed: the seed of the task draw.
    """

    def __init__(self, tasks: Any, mix: Literal["sample", "sum"] = "sample", steps_per_epoch: int = 1000,
                 seed: int = 0) -> None:
        super().__init__()
        self.tasks: list[Task] = parse_tasks(tasks)
        self.mix, self.steps_per_epoch, self.seed = mix, steps_per_epoch, seed
        self.configs = {t.name: task_config(t) for t in self.tasks}
        self.datamodules: dict[str, DataModule] = {
            t.name: instantiate(self.configs[t.name].data, _convert_="all") for t in self.tasks}
        self.train_set: TaskBatches | None = None

    def prepare_data(self) -> None:
        for dm in self.datamodules.values():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        for dm in self.datamodules.values():
            dm.setup(stage)
        loaders = {name: dm.train_dataloader() for name, dm in self.datamodules.items()}
        self.train_set = TaskBatches(loaders, {t.name: t.weight for t in self.tasks}, self.steps_per_epoch, self.mix)

    @property
    def val_names(self) -> list[str]:
        """One validation set per task, logged as ``val/<task>/...``."""
        return [t.name for t in self.tasks]

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        # Batches are formed in TaskBatches, in this process: the task draw lives in the dataset object.
        return ResumableDataLoader(self.train_set, 1, shuffle=True, seed=self.seed, collate_fn=_unbatch,
                                   num_workers=0, what="data (multitask)")

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        loaders = []
        for name, dm in self.datamodules.items():
            loader = _first(dm.val_dataloader())
            loaders.append(DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False,
                                      collate_fn=_Tagged(name, loader.collate_fn), num_workers=0))
        return loaders

    def sample_inputs(self, n: int) -> list[Any]:
        return []

    def save_processor(self, directory: str | Path) -> None:
        for name, dm in self.datamodules.items():
            dm.save_processor(Path(directory) / name)
