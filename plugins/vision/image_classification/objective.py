"""image_classification objective: cross-entropy, top-1/top-5 accuracy, a confusion matrix.

Soft targets from MixUp/CutMix and label smoothing go through ``F.cross_entropy``;
accuracy and the confusion matrix are torchmetrics objects, so they are exact over
the whole validation set and across DDP ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from modalforge.interfaces import ModelObjective, StepOutput
from modalforge.plugins.vision.image_classification.model import body_linears, classifier_heads


class ImageClassificationObjective(ModelObjective):
    """Classify images into the dataset's classes.

    Args:
        model: the ``model`` config (builder + kwargs).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(model)
        self.label_smoothing = label_smoothing
        self.classes: list[str] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        self.classes = list(getattr(self.datamodule, "classes", []))
        k = len(self.classes)
        self.top1 = MulticlassAccuracy(num_classes=k, top_k=1, average="micro")
        self.top5 = MulticlassAccuracy(num_classes=k, top_k=5, average="micro") if k > 5 else None
        self.confusion = MulticlassConfusionMatrix(num_classes=k)
        self._heads = classifier_heads(self.model, k)

    def trainable_heads(self) -> list[str]:
        return list(self._heads)

    def default_adapter_targets(self) -> list[str]:
        return body_linears(self.model, self._heads)

    def block_classes(self) -> set[type[nn.Module]]:
        from torchvision.models.vision_transformer import EncoderBlock

        return {EncoderBlock} if "vit" in str(self.model_config.get("name", "")) else set()

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self._logits(batch["images"])
        targets = batch.get("targets", batch["labels"])
        loss = F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return StepOutput(loss=loss, metrics={"acc": acc}, batch_size=len(logits))

    def validation_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        logits = self._logits(batch["images"])
        labels = batch["labels"]
        self.top1.update(logits, labels)
        if self.top5 is not None:
            self.top5.update(logits, labels)
        self.confusion.update(logits, labels)
        return StepOutput(loss=F.cross_entropy(logits, labels), batch_size=len(logits))

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor]:
        metrics = {"acc": self.top1.compute()}
        self.top1.reset()
        if self.top5 is not None:
            metrics["acc_top5"] = self.top5.compute()
            self.top5.reset()
        self.last_confusion = self.confusion.compute().cpu()
        self.confusion.reset()
        return metrics

    @torch.no_grad()
    def sample(self, inputs: list[tuple[torch.Tensor, str, str]]) -> list[str]:
        if not inputs:
            return []
        device = next(self.model.parameters()).device
        probs = self._logits(torch.stack([x for x, _, _ in inputs]).to(device)).softmax(-1)
        out = []
        for (_, truth, where), p in zip(inputs, probs):
            conf, index = p.max(-1)
            out.append(f"{Path(where).name}: predicted {self.classes[int(index)]} ({float(conf):.2f}), true {truth}")
        return out

    def save_artifacts(self, directory: str | Path) -> None:
        """``labels.json`` and, after a validation, ``confusion_matrix.csv`` (rows: true class)."""
        directory = Path(directory)
        (directory / "labels.json").write_text(json.dumps(self.classes, indent=1))
        matrix = getattr(self, "last_confusion", None)
        if matrix is not None:
            lines = ["true\\predicted," + ",".join(self.classes)]
            lines += [f"{name}," + ",".join(str(int(v)) for v in row) for name, row in zip(self.classes, matrix)]
            (directory / "confusion_matrix.csv").write_text("\n".join(lines) + "\n")
