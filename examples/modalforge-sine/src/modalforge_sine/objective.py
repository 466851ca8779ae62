"""GRU forecaster and its mean-squared-error objective."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError

from modalforge.interfaces import Objective, StepOutput
from modalforge.models import build_model


class Forecaster(nn.Module):
    """Reads the context with a GRU and predicts ``horizon`` next values with a linear head."""

    def __init__(self, hidden_size: int, num_layers: int, horizon: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, hidden_size, num_layers=num_layers, batch_first=True)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, horizon)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(context.unsqueeze(-1))
        return self.head(torch.tanh(self.proj(out[:, -1])))


def build_forecaster(hidden_size: int = 32, num_layers: int = 1, horizon: int = 4) -> Forecaster:
    """Model builder named by ``model._target_``; ``horizon`` arrives as a hint from the data."""
    return Forecaster(hidden_size, num_layers, horizon)


class SineObjective(Objective):
    """MSE on the forecast horizon; validation mean absolute error with torchmetrics."""

    def __init__(self, model: Mapping[str, Any] | None = None) -> None:
        super().__init__(model)
        self.model: nn.Module | None = None
        self.val_mae = MeanAbsoluteError()

    def configure_model(self) -> None:
        if self.model is None:
            hints = self.datamodule.model_hints() if self.datamodule else {}
            self.model = build_model(self.model_config, hints)

    def adapter_target(self) -> nn.Module:
        return self.model

    def set_adapter_target(self, module: nn.Module) -> None:
        self.model = module

    def default_adapter_targets(self) -> list[str]:
        return ["proj", "head"]

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        prediction = self.model(batch["context"])
        loss = nn.functional.mse_loss(prediction, batch["target"])
        return StepOutput(loss=loss, batch_size=batch["context"].shape[0])

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        prediction = self.model(batch["context"])
        self.val_mae.update(prediction, batch["target"])
        return StepOutput(loss=nn.functional.mse_loss(prediction, batch["target"]), batch_size=batch["context"].shape[0])

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        value = self.val_mae.compute()
        self.val_mae.reset()
        return {"mae": value}
