"""The offline default's vision tower, pretrained on the shapes before the LLaVA run: built once and cached.

LLaVA's own recipe starts from a vision tower that already sees (CLIP), then teaches the language
model to read it. Trained jointly from scratch through the LM, the demo's tiny tower gets ~1e-3 of
the gradient a direct head gives it and never learns shapes (measured: see the README), while the
same tower with a linear head learns them from fresh images in a few hundred steps. So on first use
this module trains the tiny tower (the ``model=vlm/tiny`` CLIP vision config) to classify the shape
and colour of a single shape and the number of shapes of a 2x2 grid image, on images drawn for each
batch by the shapes demo's own code (:mod:`modalforge.data.synthetic.shapes` through this plugin's
:mod:`.synthetic`), saves it (``save_pretrained``: a plain ``CLIPVisionModel`` folder) under the
modalforge cache (``vlm/tower-<settings hash>``) and loads it from there on later runs.

The head reads what LLaVA reads: the last layer's hidden states (CLS and the mean of the patch
tokens), not the pooled output whose ``post_layernorm`` LLaVA never uses. A plain loop rather than
``train plugin=clip``: it runs inside another run's model building, without a Trainer or run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modalforge.data.cache import cache_root, ensure_built
from modalforge.progress import Preparation, preparing

log = logging.getLogger(__name__)

COUNTS = 4  # the demo's count images hold 1-4 shapes


def shape_batch(batch_size: int, size: int, rng: random.Random) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fresh images: the first half one shape each (shape and colour labels), the rest 1-4 shapes (count).

    Returns CLIP-normalised pixels ``(B, 3, size, size)`` and labels (-100 where a task does not apply).
    Normalised by hand as the demo's ``CLIPImageProcessor`` does for images already at its size (its resize
    and centre crop are then identities): faster than the processor in a per-step loop.
    """
    from modalforge.data.synthetic.shapes import COLOURS, SHAPES
    from modalforge.plugins.multimodal.vlm.data import CLIP_MEAN, CLIP_STD
    from modalforge.plugins.multimodal.vlm.synthetic import _count_image, _single

    images, labels = [], {"shape": [], "colour": [], "count": []}
    colours = list(COLOURS)
    for i in range(batch_size):
        if i < batch_size // 2:
            shape = rng.choice(SHAPES)
            image, colour, _ = _single(shape, size, rng)
            labels["shape"].append(SHAPES.index(shape))
            labels["colour"].append(colours.index(colour))
            labels["count"].append(-100)
        else:
            number = rng.randint(1, COUNTS)
            image = _count_image(number, size, rng)
            labels["shape"].append(-100)
            labels["colour"].append(-100)
            labels["count"].append(number - 1)
        images.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = (np.stack(images) - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
            {k: torch.tensor(v) for k, v in labels.items()})


class ShapeHeads(nn.Module):
    """Linear heads on the tower's last hidden states (CLS and mean patch token, layer-normed)."""

    def __init__(self, width: int) -> None:
        from modalforge.data.synthetic.shapes import COLOURS, SHAPES

        super().__init__()
        self.norm = nn.LayerNorm(2 * width)
        self.heads = nn.ModuleDict({"shape": nn.Linear(2 * width, len(SHAPES)),
                                    "colour": nn.Linear(2 * width, len(COLOURS)),
                                    "count": nn.Linear(2 * width, COUNTS)})

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.norm(torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=-1))
        return {name: head(features) for name, head in self.heads.items()}


def _accuracy(tower: nn.Module, heads: ShapeHeads, size: int, seed: int, n: int = 512) -> dict[str, float]:
    """Per-task accuracy on ``n`` fresh images (another seed than training's)."""
    pixels, labels = shape_batch(n, size, random.Random(seed + 10_000))
    with torch.no_grad():
        logits = heads(tower(pixel_values=pixels).last_hidden_state)
    out = {}
    for name, y in labels.items():
        keep = y >= 0
        out[name] = float((logits[name][keep].argmax(-1) == y[keep]).float().mean())
    return out


def train_tower(folder: Path, *, vision: dict[str, Any], image_size: int, steps: int, lr: float, batch_size: int,
                seed: int) -> None:
    """Train the tiny CLIP vision tower on the shape tasks and ``save_pretrained`` it to ``folder``."""
    with preparing("vlm: pretraining the vision tower on shapes", total=steps, unit="step",
                   cached_in=folder.parent) as progress:
        _train(folder, progress, vision=vision, image_size=image_size, steps=steps, lr=lr, batch_size=batch_size,
               seed=seed)


def _train(folder: Path, progress: Preparation, *, vision: dict[str, Any], image_size: int, steps: int, lr: float,
           batch_size: int, seed: int) -> None:
    from transformers import CLIPVisionModel

    from modalforge.plugins.multimodal.vlm.model import clip_vision_config

    start = time.perf_counter()
    rng = random.Random(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tower = CLIPVisionModel(clip_vision_config(dict(vision), image_size))
        heads = ShapeHeads(tower.config.hidden_size)
        params = [p for n, p in tower.named_parameters() if "post_layernorm" not in n] + list(heads.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / max(steps, 1)))
        loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
        tower.train()
        loss = torch.tensor(float("nan"))
        for _ in progress.track(range(steps)):
            pixels, labels = shape_batch(batch_size, image_size, rng)
            logits = heads(tower(pixel_values=pixels).last_hidden_state)
            loss = sum(loss_fn(logits[k], labels[k]) for k in labels)
            loss.backward()
            progress.show(loss=f"{float(loss.detach()):.3f}")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        tower.eval()
        accuracy = _accuracy(tower, heads, image_size, seed)
    # Whichever rank builds the cache writes it: transformers' save_pretrained writes nothing on a rank
    # other than zero once torch.distributed is initialised (a first multi-process run), which left a
    # cached folder without weights.
    tower.save_pretrained(str(folder), is_main_process=True)
    if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
        from safetensors.torch import save_model

        tower.config.save_pretrained(str(folder))
        save_model(tower, str(folder / "model.safetensors"), metadata={"format": "pt"})
    seconds = time.perf_counter() - start
    (folder / "warmstart.json").write_text(json.dumps({"steps": steps, "final_loss": float(loss.detach()),
                                                       "accuracy": accuracy, "seconds": seconds}))
    progress.summary = (f"{steps} steps of {batch_size} fresh images, final loss {float(loss.detach()):.3f}, "
                        f"held-out accuracy {({k: round(v, 2) for k, v in accuracy.items()})}")


def pretrained_tower_dir(vision: dict[str, Any], image_size: int = 32, steps: int = 4000, lr: float = 1e-3,
                         batch_size: int = 64, seed: int = 0, cache_dir: str | None = None) -> Path:
    """The cached folder of the shape-pretrained tower (a ``CLIPVisionModel``), built on first use.

    The cache key holds every setting, so changing one builds another tower.
    """
    from modalforge.torch_modes import plain_torch  # leave Lightning's init modes for this CPU loop

    settings = json.dumps({"vision": dict(vision), "image_size": image_size, "steps": steps, "lr": lr,
                           "batch_size": batch_size, "seed": seed, "v": 1}, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:16]
    folder = cache_root(cache_dir) / "vlm" / f"tower-{digest}"
    if folder.exists():
        return folder
    with plain_torch():
        return ensure_built(folder, lambda tmp: train_tower(tmp, vision=vision, image_size=image_size, steps=steps,
                                                            lr=lr, batch_size=batch_size, seed=seed))
