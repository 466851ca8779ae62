"""wav2vec2 objective: masked contrastive prediction of quantised targets + codebook diversity.

Masks and negatives are drawn with transformers' own ``_compute_mask_indices`` and
``_sample_negative_indices``, and ``Wav2Vec2ForPreTraining`` computes the contrastive
and diversity losses (summed over masked frames; divided here by their number so the
logged loss does not depend on batch size). The Gumbel temperature anneals after
each optimizer step. Contrastive accuracy (the true quantised target scoring above
every negative) is computed by hand: the model does not return its logits.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.models import build_model


class Wav2Vec2Objective(ModelObjective):
    """wav2vec 2.0 self-supervised pretraining.

    Args:
        model: the ``model`` config (``build_wav2vec2``).
        mask_prob / mask_length: share of frames starting a masked span, and span length (frames).
        num_negatives: distractors per masked frame.
        gumbel_max / gumbel_min / gumbel_decay: temperature schedule, max * decay**step floored at min.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, mask_prob: float = 0.5, mask_length: int = 4,
                 num_negatives: int = 10, gumbel_max: float = 2.0, gumbel_min: float = 0.5,
                 gumbel_decay: float = 0.995) -> None:
        super().__init__(model)
        self.mask_prob, self.mask_length, self.num_negatives = mask_prob, mask_length, num_negatives
        self.gumbel = (gumbel_max, gumbel_min, gumbel_decay)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.val_acc, self.val_loss = MeanMetric(), MeanMetric()

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_model(self.model_config)
            self.model.config.num_negatives = self.num_negatives

    def set_adapter_target(self, module: nn.Module) -> None:
        self.model = module
        self._set_temperature()

    def block_classes(self) -> set[type[nn.Module]]:
        from transformers.models.wav2vec2.modeling_wav2vec2 import (Wav2Vec2EncoderLayer,
                                                                    Wav2Vec2EncoderLayerStableLayerNorm)

        return {Wav2Vec2EncoderLayer, Wav2Vec2EncoderLayerStableLayerNorm}

    def default_adapter_targets(self) -> list[str]:
        return ["q_proj", "v_proj"]

    def _temperature(self) -> float:
        top, floor, decay = self.gumbel
        return max(top * decay ** int(self.steps), floor)

    def _set_temperature(self) -> None:
        self.model.set_gumbel_temperature(self._temperature())

    def after_optimizer_step(self) -> None:
        self.steps += 1
        self._set_temperature()

    def _masks(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

        size, length = batch["input_values"].shape
        frames = int(self.model._get_feat_extract_output_lengths(length))
        sub_mask = self.model._get_feature_vector_attention_mask(frames, batch["attention_mask"])
        mask = _compute_mask_indices((size, frames), self.mask_prob, self.mask_length,
                                     attention_mask=sub_mask.cpu(), min_masks=2)
        negatives = _sample_negative_indices((size, frames), self.num_negatives, mask_time_indices=mask)
        device = batch["input_values"].device
        return torch.from_numpy(mask).to(device), torch.from_numpy(negatives.astype(np.int64)).to(device)

    def _step(self, batch: dict[str, torch.Tensor]) -> tuple[StepOutput, torch.Tensor]:
        mask, negatives = self._masks(batch)
        out = self.model(batch["input_values"], attention_mask=batch["attention_mask"], mask_time_indices=mask,
                         sampled_negative_indices=negatives)
        masked = mask.sum().clamp(min=1)
        accuracy = contrastive_accuracy(out.projected_states, out.projected_quantized_states, negatives, mask)
        metrics = {"contrastive_loss": out.contrastive_loss.detach() / masked,
                   "diversity_loss": out.diversity_loss.detach() / masked,
                   "codevector_perplexity": out.codevector_perplexity.detach(),
                   "contrastive_acc": accuracy, "gumbel_temperature": self._temperature()}
        return StepOutput(loss=out.loss / masked, metrics=metrics, num_tokens=int(masked),
                          batch_size=batch["input_values"].shape[0]), accuracy

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self._step(batch)[0]

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        with torch.no_grad():
            out, accuracy = self._step(batch)
        self.val_acc.update(accuracy)
        return out

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        value = self.val_acc.compute()
        self.val_acc.reset()
        return {"contrastive_acc": value, "chance": torch.tensor(1 / (self.num_negatives + 1))}


@torch.no_grad()
def contrastive_accuracy(projected: torch.Tensor, quantized: torch.Tensor, negatives: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Share of masked frames whose true quantised target is the most similar candidate.

    Negatives identical to the positive are ignored, as in the loss.
    """
    size, frames, dim = quantized.shape
    flat = quantized.reshape(-1, dim)
    negative_vectors = flat[negatives.reshape(-1)].reshape(size, frames, -1, dim)
    candidates = torch.cat([quantized[:, :, None], negative_vectors], dim=2)
    similarity = F.cosine_similarity(projected[:, :, None].float(), candidates.float(), dim=-1)
    same = (negative_vectors == quantized[:, :, None]).all(-1)
    similarity[:, :, 1:] = similarity[:, :, 1:].masked_fill(same, float("-inf"))
    hits = similarity.argmax(-1) == 0
    return hits[mask.bool()].float().mean()
