"""audio_lm objective: next-token cross-entropy on assistant tokens of a Qwen2-Audio model; greedy answers at validation.

The audio encoder is frozen by default (``freeze_audio_encoder``: its features are what a pretrained
encoder, e.g. a whisper_asr run, already learned); projector and language model train, or LoRA on the
language model's linear layers (``adapter=lora``) with the projector trained in full. Validation answers
held-out records greedily and scores exact match (``val/acc``; chance on the beeps demo: 0.25).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import MeanMetric

from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.losses import token_loss
from modalforge.text.answers import normalise_answer
from modalforge.text.stops import stop_token_ids


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class AudioLMObjective(ModelObjective):
    """Train a Qwen2-Audio model on audio chats.

    Args:
        model: the ``model`` config (``build_audio_lm``).
        freeze_audio_encoder: keep the audio encoder frozen.
        freeze_language_model: keep the language model frozen (projector only, a first alignment stage).
        eval_max_new_tokens: greedy tokens per held-out answer (``val/acc``).
    """

    def __init__(self, model: Mapping[str, Any] | None = None, freeze_audio_encoder: bool = True,
                 freeze_language_model: bool = False, eval_max_new_tokens: int = 8) -> None:
        super().__init__(model)
        self.freeze_audio_encoder, self.freeze_language_model = freeze_audio_encoder, freeze_language_model
        self.eval_max_new_tokens = eval_max_new_tokens
        self.val_loss = MeanMetric()

    # ---- parts ----------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        if self.model is None:
            return []
        inner = _base(self.model).model
        frozen = [inner.audio_tower] if self.freeze_audio_encoder else []
        if self.freeze_language_model:
            frozen += [inner.language_model, _base(self.model).lm_head]
        return frozen

    def default_adapter_targets(self) -> list[str]:
        """LoRA goes on the language model's linear layers (never the encoder, projector or head)."""
        base = _base(self.model)
        inside = {id(m) for m in base.model.language_model.modules()}
        return [name for name, m in base.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]

    def trainable_heads(self) -> list[str]:
        return ["model.multi_modal_projector"]

    def block_classes(self) -> set[type[nn.Module]]:
        if self.model is None:
            return set()
        names = set(getattr(_base(self.model).model.language_model, "_no_split_modules", None) or [])
        names.add("Qwen2AudioEncoderLayer")
        return {type(m) for m in self.model.modules() if type(m).__name__ in names}

    # ---- steps ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = token_loss(self.model, batch["labels"], impl=self.loss_impl, **inputs)
        metrics = {"token_acc": out.accuracy} if out.accuracy is not None else {}
        return StepOutput(loss=out.loss, metrics=metrics, num_tokens=out.count, batch_size=batch["input_ids"].shape[0],
                          num_learned_tokens=out.count, mean_over=out.count)

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        with torch.no_grad():
            out = self.training_step(batch)
        self.val_loss.update(out.loss.detach(), weight=out.num_tokens)
        return out

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        metrics = {"ppl": torch.exp(self.val_loss.compute())}
        self.val_loss.reset()
        questions = getattr(self.datamodule, "questions", None) or []
        if questions:
            answers = self.answer(questions)
            right = [normalise_answer(a) == normalise_answer(q.answer) for q, a in zip(questions, answers)]
            metrics["acc"] = torch.tensor(sum(right) / len(right))
        return metrics

    def _stops(self) -> list[int]:
        tokenizer = self.datamodule.tokenizer
        return stop_token_ids(tokenizer)  # EOS and the template's own end-of-turn markers

    @torch.no_grad()
    def answer(self, questions: list[Any], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers to held-out clips."""
        dm, tokenizer = self.datamodule, self.datamodule.tokenizer
        param = next(self.model.parameters())
        answers = []
        for clip in questions:
            inputs = {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
                      for k, v in dm.generation_inputs(clip).items()}
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens or self.eval_max_new_tokens,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=self._stops())
            answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return answers

    def save_pretrained(self, directory: str | Path) -> None:
        """The Qwen2-Audio folder, generation stopping at the chat template's end of turn as in training."""
        config = getattr(_base(self.model), "generation_config", None)
        if getattr(self.datamodule, "tokenizer", None) is not None and config is not None:
            config.eos_token_id = self._stops()
            config.pad_token_id = self.datamodule.tokenizer.pad_token_id
        super().save_pretrained(directory)

    def sample(self, inputs: list[Any]) -> list[str]:
        return [f"{c.path or c.where} | {c.question} -> {a} (expected: {c.answer})"
                for c, a in zip(inputs, self.answer(inputs))]
