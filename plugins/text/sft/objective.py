"""sft objective: cross-entropy on the learned (assistant) tokens, token accuracy, samples.

The loss comes from :func:`modalforge.losses.token_loss` (``module.loss_impl``: chunked at a large
vocabulary, so the full logits are never held).

Packed rows come with a block-diagonal attention mask and per-example position ids,
so the loss of a packed row is the loss of its examples taken one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import MeanMetric

from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.losses import token_loss
from modalforge.text.models import block_classes_for
from modalforge.text.generate import answer
from modalforge.text.packing import input_token_count
from modalforge.text.stops import set_generation_stops
from modalforge.text.tokenize import IGNORE


def token_loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean next-token CE over labelled tokens, their accuracy, and their count."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    mask = shift_labels != IGNORE
    count = int(mask.sum())
    loss = nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask])
    accuracy = (shift_logits[mask].argmax(-1) == shift_labels[mask]).float().mean()
    return loss, accuracy, count


class SFTObjective(ModelObjective):
    """Supervised fine-tuning of a causal LM.

    Args:
        model: the ``model`` config (``build_causal_lm`` by default).
        sample_max_new_tokens: length of generated samples.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, sample_max_new_tokens: int = 16) -> None:
        super().__init__(model)
        self.sample_max_new_tokens = sample_max_new_tokens
        self.val_loss = MeanMetric()

    def block_classes(self) -> set[type[nn.Module]]:
        return block_classes_for(self.model_config)

    def _forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        # module.loss_impl: chunked never holds the [batch, length, vocab] logits; same mean over learned tokens
        out = token_loss(self.model, batch["labels"], impl=self.loss_impl, input_ids=batch["input_ids"],
                         attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
        metrics = {"token_acc": out.accuracy} if out.accuracy is not None else {}
        return StepOutput(loss=out.loss, metrics=metrics, num_tokens=input_token_count(batch),
                          batch_size=batch["input_ids"].shape[0], num_learned_tokens=out.count, mean_over=out.count)

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = self._forward(batch)
        stats = getattr(self.datamodule, "stats", None) or {}
        out.metrics.update({k: float(v) for k, v in stats.items()})
        return out

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = self._forward(batch)
        self.val_loss.update(out.loss.detach(), weight=out.num_learned_tokens)
        return out

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        mean = self.val_loss.compute()
        self.val_loss.reset()
        return {"ppl": torch.exp(mean)}

    def sample(self, inputs: list[list[dict]]) -> list[str]:
        return answer(self.model, self.datamodule.processor, inputs, self.sample_max_new_tokens)

    def save_pretrained(self, directory: str | Path) -> None:
        # final/: plain ``model.generate`` stops at the template's end of turn (generation_config.eos_token_id)
        set_generation_stops(self.adapter_target(), getattr(self.datamodule, "processor", None))
        super().save_pretrained(directory)
