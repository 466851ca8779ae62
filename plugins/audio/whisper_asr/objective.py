"""whisper_asr objective: seq2seq cross-entropy, greedy decoding, WER and CER.

The decoder prompt (start, language, task, no-timestamps) is in the inputs but not in
the labels, so only the transcript and its end token are learned. Validation decodes
greedily from the same prompt and scores hypotheses with torchmetrics' WER and CER.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics.text import CharErrorRate, WordErrorRate

from modalforge.interfaces import ModelObjective, StepOutput

IGNORE = -100


class WhisperASRObjective(ModelObjective):
    """Fine-tune or train Whisper for transcription.

    Args:
        model: the ``model`` config (``build_whisper``).
        freeze_encoder: keep the audio encoder frozen (decoder-only fine-tuning).
        max_new_tokens: greedy decoding length at validation.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, freeze_encoder: bool = False,
                 max_new_tokens: int = 24) -> None:
        super().__init__(model)
        self.freeze_encoder, self.max_new_tokens = freeze_encoder, max_new_tokens
        self.wer, self.cer = WordErrorRate(), CharErrorRate()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.model.get_encoder()] if self.freeze_encoder else []

    def default_adapter_targets(self) -> list[str]:
        return ["q_proj", "v_proj"]

    def block_classes(self) -> set[type[nn.Module]]:
        from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer, WhisperEncoderLayer

        return {WhisperEncoderLayer, WhisperDecoderLayer}

    # ---- steps --------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self.model(input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"],
                            use_cache=False).logits
        labels = batch["labels"]
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE)
        mask = labels != IGNORE
        accuracy = (logits.argmax(-1)[mask] == labels[mask]).float().mean()
        learned = mask.sum()
        return StepOutput(loss=loss, metrics={"token_acc": accuracy}, num_tokens=learned,
                          batch_size=labels.shape[0], num_learned_tokens=learned, mean_over=learned)

    def _texts(self, token_rows: list[list[int]]) -> list[str]:
        tokenizer = self.datamodule.processor
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in token_rows]

    @torch.no_grad()
    def transcribe(self, features: torch.Tensor, language: str | None = None) -> list[str]:
        """Greedy transcripts of a batch of log-Mel features."""
        dm = self.datamodule
        prompt = dm.prompt_ids(language or dm.language)
        end = dm.end_id()
        tokens = torch.tensor([prompt] * len(features), device=features.device)
        done = torch.zeros(len(features), dtype=torch.bool, device=features.device)
        encoded = None
        for _ in range(self.max_new_tokens):
            if encoded is None:
                # The first step through the model's own forward, which also encodes: under strategy=fsdp
                # the encoder alone is no sharded unit, and calling it directly would skip the gather.
                out = self.model(input_features=features, decoder_input_ids=tokens, use_cache=False)
                encoded = (out.encoder_last_hidden_state,)
            else:
                out = self.model(encoder_outputs=encoded, decoder_input_ids=tokens, use_cache=False)
            logits = out.logits[:, -1]
            step = logits.argmax(-1).masked_fill(done, end)
            tokens = torch.cat([tokens, step[:, None]], dim=1)
            done |= step == end
            if done.all():
                break
        rows = []
        for row in tokens[:, len(prompt):].tolist():
            rows.append(row[: row.index(end)] if end in row else row)
        return self._texts(rows)

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        out = self.training_step(batch)
        end = self.datamodule.end_id()
        references = self._texts([[t for t in row if t not in (IGNORE, end)] for row in batch["labels"].tolist()])
        hypotheses = self.transcribe(batch["input_features"])
        self.wer.update(hypotheses, references)
        self.cer.update(hypotheses, references)
        return out

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        metrics = {"wer": self.wer.compute(), "cer": self.cer.compute()}
        self.wer.reset()
        self.cer.reset()
        return metrics

    def sample(self, inputs: list[int]) -> list[str]:
        dm = self.datamodule
        device = next(self.model.parameters()).device
        items = [dm.val_set[i] for i in inputs]
        hypotheses = self.transcribe(torch.stack([f for f, _, _ in items]).to(device))
        return [f"ref: {dm.val_set.items[i].text!r} | hyp: {h!r}" for i, h in zip(inputs, hypotheses)]
