"""vlm objective: next-token cross-entropy on text tokens of a LLaVA model; answers and captions at validation.

At validation, greedy answers to held-out questions score exact match (``val/acc``) and greedy captions
of held-out captioned images score BLEU-4 and ROUGE-L (``val/caption_bleu``, ``val/caption_rougeL``,
torchmetrics' ``BLEUScore`` / ``ROUGEScore``; CIDEr, the usual captioning metric, is not in torchmetrics
and needs the corpus-level IDF of ``pycocoevalcap``, so it is not computed here).

Which parts learn is configuration: ``freeze_vision_tower`` / ``freeze_language_model`` /
``freeze_projector`` (stage 1 = projector only; stage 2 = projector + LM, or LoRA on the LM with the
projector trained in full), and ``optim.param_groups`` gives each part its own learning rate.
Parts of the tower LLaVA never uses (the pooled-output norm, layers after ``vision_feature_layer``)
are found once by a probe forward and stay frozen, so nothing trainable sits idle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics import MeanMetric

from modalforge.errors import ModalforgeError
from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.losses import token_loss
from modalforge.text.answers import normalise_answer
from modalforge.plugins.multimodal.vlm.mrope import packed_mrope_positions
from modalforge.plugins.multimodal.vlm.parts import Parts, base_model, vlm_parts
from modalforge.text.stops import stop_token_ids


def _llava(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return base_model(model)


def _tower_without_projector(parts: Parts) -> list[nn.Module]:
    """The tower to freeze; where the projector lives inside it (Qwen2-VL's merger), the rest of it."""
    children = list(parts.tower.children())
    if any(child is parts.projector for child in children):
        return [child for child in children if child is not parts.projector]
    return [parts.tower]


class VLMObjective(ModelObjective):
    """Train a LLaVA-style model on interleaved image-text data.

    Args:
        model: the ``model`` config (``build_vlm``).
        freeze_vision_tower: keep the vision tower frozen (LLaVA's recipe for a pretrained tower).
        freeze_language_model: keep the language model frozen (stage 1: projector only).
        freeze_projector: keep the projector frozen.
        eval_max_new_tokens: greedy tokens per held-out answer (``val/acc``).
        caption_max_new_tokens: greedy tokens per held-out caption (``val/caption_*``).
        sample_max_new_tokens: tokens per human-readable sample (captions get ``caption_max_new_tokens``).
    """

    def __init__(self, model: Mapping[str, Any] | None = None, freeze_vision_tower: bool = False,
                 freeze_language_model: bool = False, freeze_projector: bool = False, eval_max_new_tokens: int = 8,
                 caption_max_new_tokens: int = 24, sample_max_new_tokens: int = 16) -> None:
        super().__init__(model)
        from torchmetrics.text import BLEUScore, ROUGEScore

        self.freeze_vision_tower, self.freeze_language_model = freeze_vision_tower, freeze_language_model
        self.freeze_projector = freeze_projector
        self.eval_max_new_tokens, self.sample_max_new_tokens = eval_max_new_tokens, sample_max_new_tokens
        self.caption_max_new_tokens = caption_max_new_tokens
        self.val_loss = MeanMetric()
        self.caption_bleu = BLEUScore(n_gram=4, smooth=True)  # smoothed: short captions often miss a 4-gram
        self.caption_rouge = ROUGEScore(rouge_keys=("rougeL",))
        self._unused: list[nn.Module] = []

    # ---- building -------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        self._unused = self._probe_tower()

    def _probe_tower(self) -> list[nn.Module]:
        """Check the image token count against the tower's output; return the tower parts LLaVA never uses."""
        llava = _llava(self.model)
        if self.datamodule is None or getattr(self.datamodule, "images", None) is not None:
            return []  # the processor counted the image tokens; the model checks them in its forward
        tower = llava.model.vision_tower
        if any(p.is_meta for p in tower.parameters()):
            return []
        size = self.datamodule.model_hints()["image_size"]
        expected = self.datamodule.image_tokens
        pixels = torch.zeros(1, 3, size, size, dtype=next(tower.parameters()).dtype)
        with torch.enable_grad():
            try:
                features = llava.model.get_image_features(pixel_values=pixels).pooler_output
            except Exception as err:  # noqa: BLE001 - a tower that refuses the input size says so in its own words
                raise ModalforgeError(f"the vision tower does not take {size}x{size} images (data.image_size): "
                                      f"{type(err).__name__}: {err}") from err
            produced = int(features[0].shape[0])
            if produced != expected:
                raise ModalforgeError(
                    f"the data expands each image to {expected} image tokens (data.image_size={size}, patch size "
                    f"{self.datamodule.processor.patch_size}), but the vision tower produces {produced} features per "
                    "image; set data.image_size / data.patch_size to the tower's")
            features[0].float().sum().backward()
        unused = {id(p) for p in tower.parameters() if p.grad is None}
        tower.zero_grad(set_to_none=True)
        llava.model.multi_modal_projector.zero_grad(set_to_none=True)
        modules = []
        for name, module in tower.named_modules():
            params = list(module.parameters())
            if params and all(id(p) in unused for p in params) and not any(name.startswith(f"{m}.") for m, _ in modules):
                modules.append((name, module))
        return [m for _, m in modules]

    def frozen_modules(self) -> list[nn.Module]:
        if self.model is None:
            return []
        parts = vlm_parts(self.model)
        frozen = list(self._unused)
        if self.freeze_vision_tower:
            frozen += _tower_without_projector(parts)
        if self.freeze_language_model:
            frozen += [parts.language_model, parts.lm_head]
        if self.freeze_projector:
            frozen.append(parts.projector)
        return frozen

    def default_adapter_targets(self) -> list[str]:
        """LoRA goes on the language model's linear layers (never the tower, never the head)."""
        llava = _llava(self.model)
        inside = {id(m) for m in vlm_parts(llava).language_model.modules()}
        return [name for name, module in llava.named_modules() if isinstance(module, nn.Linear) and id(module) in inside]

    def trainable_heads(self) -> list[str]:
        return [] if self.freeze_projector else [vlm_parts(self.model).projector_name]

    def block_classes(self) -> set[type[nn.Module]]:
        if self.model is None:
            return set()
        names = set(getattr(_llava(self.model), "_no_split_modules", None) or [])
        return {type(m) for m in self.model.modules() if type(m).__name__ in names}

    # ---- steps ----------------------------------------------------------------------------
    def _forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        # use_cache=False: with a cache transformers does not derive packed boundaries from position ids
        # module.loss_impl: chunked applies the LM head per chunk of rows, never holding the full logits
        # every other key is a model input the processor made (image_grid_thw, token types, pixel masks...)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in inputs and "mm_token_type_ids" in inputs:
            inputs["position_ids"] = packed_mrope_positions(_llava(self.model), inputs)
        out = token_loss(self.model, batch["labels"], impl=self.loss_impl, **inputs)
        count = out.count
        metrics = {"token_acc": out.accuracy} if out.accuracy is not None else {}
        return StepOutput(loss=out.loss, metrics=metrics, num_tokens=count,
                          batch_size=batch["input_ids"].shape[0], num_learned_tokens=count, mean_over=count)

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self._forward(batch)

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        with torch.no_grad():
            out = self._forward(batch)
        self.val_loss.update(out.loss.detach(), weight=out.num_tokens)
        return out

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        metrics = {"ppl": torch.exp(self.val_loss.compute())}
        self.val_loss.reset()
        questions = getattr(self.datamodule, "questions", None) or []
        if questions:
            answers = self.answer(questions, self.eval_max_new_tokens)
            right = [normalise_answer(a) == normalise_answer(q.answer) for q, a in zip(questions, answers)]
            metrics["acc"] = torch.tensor(sum(right) / len(right))
        captions = getattr(self.datamodule, "captions", None) or []
        if captions:
            predicted = self.answer(captions, self.caption_max_new_tokens)
            references = [[c.answer] for c in captions]
            metrics["caption_bleu"] = self.caption_bleu(predicted, references)
            metrics["caption_rougeL"] = self.caption_rouge(predicted, references)["rougeL_fmeasure"]
            self.caption_bleu.reset()
            self.caption_rouge.reset()
        return metrics

    @torch.no_grad()
    def answer(self, questions: list[Any], max_new_tokens: int) -> list[str]:
        """Greedy answers to held-out questions (their prompts already carry expanded image tokens)."""
        dm = self.datamodule
        tokenizer = dm.tokenizer
        device = next(self.model.parameters()).device
        stop = stop_token_ids(tokenizer)  # EOS and the template's own end of turn (<end_of_utterance>, <end_of_turn>...)
        answers = []
        dtype = next(self.model.parameters()).dtype
        for q in questions:
            inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                      for k, v in dm.generation_inputs(q).items()}
            ids = inputs["input_ids"]
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        return answers

    def save_pretrained(self, directory: str | Path) -> None:
        """The LLaVA folder, with generation stopping at the chat template's end of turn as in training."""
        tokenizer = getattr(self.datamodule, "tokenizer", None)
        config = getattr(_llava(self.model), "generation_config", None)
        if tokenizer is not None and config is not None:
            config.eos_token_id = stop_token_ids(tokenizer)
            config.pad_token_id = tokenizer.pad_token_id
        super().save_pretrained(directory)

    def sample(self, inputs: list[Any]) -> list[str]:
        from modalforge.plugins.multimodal.vlm.data import CAPTION

        answers: dict[int, str] = {}
        for is_caption, limit in ((False, self.sample_max_new_tokens), (True, self.caption_max_new_tokens)):
            index = [i for i, q in enumerate(inputs) if (q.question == CAPTION) == is_caption]
            answers.update(zip(index, self.answer([inputs[i] for i in index], limit)))
        return [f"{', '.join(r.describe() for r in q.images)} | {q.question} -> {answers[i]} (expected: {q.answer})"
                for i, q in enumerate(inputs)]
