"""reward_model objective: Bradley-Terry pairwise loss, -log sigmoid(r_chosen - r_rejected).

The trained model saves in Hugging Face format (``AutoModelForSequenceClassification``),
so a later PPO/GRPO run, or any HF user, loads it as a reward model.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.plugins.text.reward_model.model import build_reward_model
from modalforge.text.models import block_classes_for


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_c - r_r - margin)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def scored(model: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A ``model=preset/<family>`` names the core's causal-LM builder: build the same model with a score head."""
    if model is not None and str(model.get("_target_", "")).endswith(".build_causal_lm"):
        return {**model, "_target_": f"{build_reward_model.__module__}.{build_reward_model.__name__}"}
    return model


class RewardModelObjective(ModelObjective):
    """Learn a scalar reward that ranks chosen above rejected.

    Args:
        model: the ``model`` config (``build_reward_model``).
        margin: optional fixed margin in the Bradley-Terry loss.
        center_rewards: weight of a penalty on the squared mean reward (keeps rewards centred, as in RLHF practice).
    """

    def __init__(self, model: Mapping[str, Any] | None = None, margin: float = 0.0,
                 center_rewards: float = 0.0) -> None:
        super().__init__(scored(model))
        self.margin, self.center_rewards = margin, center_rewards
        self.val_accuracy = MeanMetric()

    def trainable_heads(self) -> list[str]:
        return ["score"]

    def block_classes(self) -> set[type[nn.Module]]:
        return block_classes_for(self.model_config)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[StepOutput, torch.Tensor]:
        scores = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        chosen, rejected = scores.float().chunk(2)
        loss = bradley_terry(chosen, rejected, self.margin)
        if self.center_rewards:
            loss = loss + self.center_rewards * (scores.float().mean() ** 2)
        correct = (chosen > rejected).float()
        metrics = {"rewards/chosen": chosen.detach().mean(), "rewards/rejected": rejected.detach().mean(),
                   "rewards/margin": (chosen - rejected).detach().mean(), "accuracy": correct.mean()}
        return StepOutput(loss=loss, metrics=metrics, batch_size=len(chosen),
                          num_tokens=batch["attention_mask"].sum()), correct

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self._step(batch)[0]

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        out, correct = self._step(batch)
        self.val_accuracy.update(correct)
        return out

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        value = self.val_accuracy.compute()
        self.val_accuracy.reset()
        return {"preference_accuracy": value}
