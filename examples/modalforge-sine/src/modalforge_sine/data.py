"""Synthetic sine waves with random frequency and phase, split into context and horizon."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import TensorDataset

from modalforge.data.loader import ResumableDataLoader
from modalforge.interfaces import DataModule


class SineDataModule(DataModule):
    """Batches ``{"context": [B, context], "target": [B, horizon]}``."""

    def __init__(self, num_series: int = 512, context: int = 24, horizon: int = 4, noise: float = 0.02,
                 batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.num_series, self.context, self.horizon = num_series, context, horizon
        self.noise, self.batch_size, self.seed = noise, batch_size, seed
        self.train_set = self.val_set = None

    def _waves(self, count: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        t = torch.arange(self.context + self.horizon, dtype=torch.float32)
        freq = 0.1 + 0.4 * torch.rand(count, 1, generator=g)
        phase = 2 * math.pi * torch.rand(count, 1, generator=g)
        waves = torch.sin(freq * t + phase) + self.noise * torch.randn(count, t.numel(), generator=g)
        return TensorDataset(waves[:, : self.context], waves[:, self.context:])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._waves(self.num_series, self.seed)
            self.val_set = self._waves(max(32, self.num_series // 8), self.seed + 1)

    @staticmethod
    def _collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"context": torch.stack([c for c, _ in items]), "target": torch.stack([t for _, t in items])}

    def train_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.train_set, self.batch_size, shuffle=True, seed=self.seed,
                                   collate_fn=self._collate, drop_last=True)

    def val_dataloader(self) -> ResumableDataLoader:
        self.setup()
        return ResumableDataLoader(self.val_set, self.batch_size, shuffle=False, collate_fn=self._collate)

    def model_hints(self) -> dict[str, Any]:
        return {"horizon": self.horizon}
