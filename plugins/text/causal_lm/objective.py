"""causal_lm objective: next-token cross-entropy, validation perplexity, text samples.

The loss is the model's own shifted next-token cross-entropy, or with ``module.loss_impl`` chunked
(the default from a 32k vocabulary) the same number from :func:`modalforge.losses.token_loss`
without ever holding the full logits; perplexity is exp of the token-weighted mean validation loss,
accumulated by a torchmetrics ``MeanMetric`` so it is exact across batches and ranks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import MeanMetric

from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.losses import resolve_loss_impl, token_loss
from modalforge.text.models import block_classes_for


class CausalLMObjective(ModelObjective):
    """Next-token prediction on packed blocks.

    Args:
        model: the ``model`` config (builder ``_target_`` + kwargs).
        sample_max_new_tokens: length of the text samples logged at validation.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, sample_max_new_tokens: int = 24) -> None:
        super().__init__(model)
        self.sample_max_new_tokens = sample_max_new_tokens
        self.val_loss = MeanMetric()

    def block_classes(self) -> set[type[nn.Module]]:
        return block_classes_for(self.model_config)

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        input_ids = batch["input_ids"]
        # module.loss_impl: dense is the model's own loss (any model returning .loss); chunked equals it
        # without the full logits
        if resolve_loss_impl(self.loss_impl, self.model)[0] == "dense":
            return self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss, input_ids.numel()
        out = token_loss(self.model, input_ids, impl=self.loss_impl, accuracy=False, input_ids=input_ids)
        return out.loss, input_ids.numel()

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        loss, tokens = self._loss(batch)
        rows = batch["input_ids"].shape[0]  # packed blocks without padding; every token but a row's last is a target
        return StepOutput(loss=loss, num_tokens=tokens, batch_size=rows, num_learned_tokens=tokens - rows,
                          mean_over=tokens - rows)

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        loss, tokens = self._loss(batch)
        self.val_loss.update(loss.detach(), weight=tokens)
        rows = batch["input_ids"].shape[0]  # packed blocks without padding; every token but a row's last is a target
        return StepOutput(loss=loss, num_tokens=tokens, batch_size=rows, num_learned_tokens=tokens - rows)

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        mean = self.val_loss.compute()
        self.val_loss.reset()
        return {"ppl": torch.exp(mean)}

    @torch.no_grad()
    def sample(self, inputs: list[str]) -> list[str]:
        tokenizer = self.datamodule.processor if self.datamodule is not None else None
        if tokenizer is None or not inputs:
            return []
        device = next(self.model.parameters()).device
        texts = []
        for prompt in inputs:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            generated = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                            max_new_tokens=self.sample_max_new_tokens, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(generated[0], skip_special_tokens=True))
        return texts
