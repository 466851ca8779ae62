"""Evaluation helpers: the feature network of FID / KID, and a trained classifier for sample accuracy.

FID and KID are torchmetrics' own; what varies is the network whose features they compare.
Inception-v3 (the usual one) needs ``torch-fidelity`` and its weights on local disk; offline
runs still get a number from a local network: an ``image_classification`` run's ``final/``
(its penultimate features), or a fixed random convolutional network (hand-written: no library
ships one). Scores are comparable only between runs that used the same feature network.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalforge.errors import ModalforgeError

log = logging.getLogger(__name__)
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


class RandomConvFeatures(nn.Module):
    """A fixed, seeded random conv net -> 256-d features ("random-feature FID").

    Random convolutional features separate colour, texture and shape statistics well enough
    to rank the samples of one run over time; they are not comparable with Inception FID.
    """

    num_features = 256

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.convs = nn.ModuleList()
        channels = [3, 32, 64, 128]
        for cin, cout in zip(channels[:-1], channels[1:]):
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        x = x * 2 - 1
        for conv in self.convs:
            x = F.avg_pool2d(F.relu(conv(x)), 2)
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def inception_available() -> bool:
    """``torch-fidelity`` importable and its Inception weights already in the torch hub cache."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS).exists()


class ImageClassifier(nn.Module):
    """An ``image_classification`` run's ``final/``: images in ``[0, 1]`` -> logits, and features.

    Args:
        model: the classifier. labels: its class names. mean / std / image_size: its preprocessing.
    """

    def __init__(self, model: nn.Module, labels: list[str], mean: list[float], std: list[float],
                 image_size: int) -> None:
        super().__init__()
        self.model, self.labels, self.image_size = model, labels, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        self._head = linears[-1] if linears else None
        self._features: torch.Tensor | None = None
        if self._head is not None:
            self._head.register_forward_hook(self._keep_features)
            self.num_features = self._head.in_features
        self.requires_grad_(False)

    def _keep_features(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._features = inputs[0]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        out = self.model((x - self.mean) / self.std)
        return out.logits if hasattr(out, "logits") else out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (the input of the last linear layer), for FID / KID."""
        self.logits(images)
        return self._features.flatten(1)


def load_classifier(path: str, what: str = "objective.evaluation.classifier") -> ImageClassifier:
    """Load an ``image_classification`` run's ``final/`` (``modalforge.json`` + weights + ``labels.json``)."""
    from omegaconf import OmegaConf

    from modalforge.models import build_model

    folder = Path(path).expanduser()
    meta_file, labels_file = folder / "modalforge.json", folder / "labels.json"
    if not meta_file.is_file() or not labels_file.is_file():
        raise ModalforgeError(f"{what}={path!r} is not an image_classification run's final/ folder "
                              f"(modalforge.json and labels.json are missing)")
    meta = json.loads(meta_file.read_text())
    if meta.get("plugin") != "image_classification":
        raise ModalforgeError(f"{what}={path!r} was written by plugin {meta.get('plugin')!r}, not image_classification")
    labels = json.loads(labels_file.read_text())
    config = OmegaConf.create(meta.get("config") or {})
    data = config.get("data") or {}
    mean, std = list(data.get("mean", [0.485, 0.456, 0.406])), list(data.get("std", [0.229, 0.224, 0.225]))
    image_size = int(data.get("image_size", 32))
    if (folder / "config.json").exists():  # a Hugging Face classifier saved with save_pretrained
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(str(folder))
    else:
        model_cfg = OmegaConf.to_container(config.model, resolve=False)
        model = build_model(model_cfg, {"num_classes": len(labels), "image_size": image_size})
        from safetensors.torch import load_model

        load_model(model, str(folder / "model.safetensors"))
    return ImageClassifier(model.eval(), labels, mean, std, image_size)


def fid_feature_network(spec: str, seed: int = 0) -> tuple[nn.Module | int, str]:
    """The ``feature`` argument of torchmetrics' FID / KID and a short name of it, from ``objective.evaluation.fid_features``.

    ``auto``: Inception when available locally, else random conv features; ``inception``;
    ``random``; or a path to an ``image_classification`` run's ``final/`` (its penultimate
    features) or a ``clip`` run's ``final/`` (its image embedding).
    """
    if spec == "auto":
        spec = "inception" if inception_available() else "random"
        if spec == "random":
            log.info("diffusion: Inception weights not available locally; FID/KID use random conv features "
                     "(objective.evaluation.fid_features=<image_classification final/> for a trained network)")
    if spec == "inception":
        if not inception_available():
            raise ModalforgeError("objective.evaluation.fid_features=inception needs torch-fidelity and its weights "
                                  f"({INCEPTION_WEIGHTS}) in {Path(torch.hub.get_dir()) / 'checkpoints'}; "
                                  "use fid_features=random or an image_classification run's final/")
        return 2048, "inception"
    if spec == "random":
        return RandomConvFeatures(seed), "random"
    from modalforge.plugins.vision.diffusion.clip_towers import OpenClipImageFeatures, is_clip_run

    if is_clip_run(spec):
        return OpenClipImageFeatures(spec), "clip"
    return load_classifier(spec, "objective.evaluation.fid_features"), "classifier"


def build_fid_kid(feature: nn.Module | int, num_fake: int, num_real: int) -> dict[str, Any]:
    """torchmetrics FID and KID over ``feature``; real features are kept across resets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = max(2, min(num_fake, num_real, 100))
    # sync_on_compute=False: under DDP only rank zero samples and scores (the others would never join a sync).
    return {"fid": FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False,
                                            sync_on_compute=False),
            "kid": KernelInceptionDistance(feature=feature, subset_size=subset, subsets=20, normalize=True,
                                           reset_real_features=False, sync_on_compute=False)}
