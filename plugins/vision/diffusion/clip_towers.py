"""A ``clip`` run's ``final/`` as a frozen helper: its text tower as the text encoder, its image tower
as the FID / KID feature network.

The clip plugin saves the open_clip model with the builder that made it and that builder's
arguments (``open_clip_config.json``), its weights (``open_clip_model.safetensors``) and its
preprocessing (``preprocess_config.json``: tokenizer, context length, image size, mean / std).
The model is rebuilt that way and its weights loaded; nothing reaches a hub.

open_clip's ``encode_text`` returns only the pooled, projected embedding, and a denoiser's
cross-attention needs the token states too: :class:`OpenClipTextTower` runs the same steps
(token + positional embedding, transformer, ``ln_final``; open_clip's own ``text_global_pool``
and projection), keeping the states. Hand-written because open_clip offers no such call.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modalforge.errors import ModalforgeError

CLIP_CONFIG, CLIP_WEIGHTS, CLIP_PREPROCESS = "open_clip_config.json", "open_clip_model.safetensors", \
    "preprocess_config.json"


def is_clip_run(path: str | Path) -> bool:
    folder = Path(path).expanduser()
    return (folder / CLIP_CONFIG).is_file() or (folder / "final" / CLIP_CONFIG).is_file()


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / CLIP_CONFIG).exists() and (folder / "final" / CLIP_CONFIG).exists():
        folder = folder / "final"  # a clip run directory instead of its final/
    if not (folder / CLIP_CONFIG).is_file() or not (folder / CLIP_WEIGHTS).is_file():
        state = "does not exist" if not folder.exists() else f"holds no {CLIP_CONFIG} + {CLIP_WEIGHTS}"
        raise ModalforgeError(f"{what}={str(path)!r}: {folder} {state}; point it at the final/ folder of a "
                              "`train plugin=clip` run")
    return folder


def load_clip_run(path: str | Path, what: str) -> tuple[nn.Module, dict[str, Any], Path]:
    """The open_clip model of a clip run's ``final/`` (its weights loaded), its preprocessing, and the folder."""
    from hydra.utils import get_object
    from safetensors.torch import load_model

    folder = _folder(path, what)
    saved = json.loads((folder / CLIP_CONFIG).read_text())
    kwargs = {k: v for k, v in (saved.get("kwargs") or {}).items() if k not in ("_target_", "pretrained")}
    if not saved.get("builder"):  # the clip plugin names the builder that made the model; nothing is guessed
        raise ModalforgeError(f"{folder / CLIP_CONFIG} names no builder (not written by `train plugin=clip`?)",
                              where=what)
    builder = get_object(str(saved["builder"]))
    model = builder(**kwargs)
    try:
        load_model(model, str(folder / CLIP_WEIGHTS))
    except RuntimeError as err:
        raise ModalforgeError(f"{what}={str(path)!r}: the weights in {folder / CLIP_WEIGHTS} do not match "
                              f"{CLIP_CONFIG} (an adapter-only export? export the clip run merged): "
                              f"{str(err).splitlines()[0]}") from err
    preprocess = json.loads((folder / CLIP_PREPROCESS).read_text()) if (folder / CLIP_PREPROCESS).exists() else {}
    preprocess.setdefault("context_length", kwargs.get("context_length", 77))
    preprocess.setdefault("image_size", kwargs.get("image_size", 224))
    return model.eval(), preprocess, folder


class OpenClipTokenizer:
    """The clip run's open_clip tokenizer behind the small part of the ``transformers`` tokenizer API the
    data module uses (``__call__`` -> ``input_ids``, ``len``, ``save_pretrained``)."""

    def __init__(self, preprocess: dict[str, Any]) -> None:
        import open_clip

        self.preprocess = preprocess
        self.context_length = int(preprocess["context_length"])
        name = preprocess.get("tokenizer")
        if name and name != "open_clip.SimpleTokenizer":
            self.tokenizer = open_clip.get_tokenizer(name, context_length=self.context_length)
        else:
            self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=self.context_length)
        self.model_max_length = self.context_length

    def __call__(self, texts: list[str] | str, **_: Any) -> dict[str, torch.Tensor]:
        # open_clip pads / truncates to the tower's own context length (its positional embedding).
        return {"input_ids": self.tokenizer([texts] if isinstance(texts, str) else list(texts))}

    def __len__(self) -> int:
        return int(getattr(self.tokenizer, "vocab_size", 49408))

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / CLIP_PREPROCESS).write_text(json.dumps(self.preprocess, indent=2))


class OpenClipTextTower(nn.Module):
    """The text tower of a clip run: token ids -> ``last_hidden_state`` (token states, for cross- or
    joint attention) and ``text_embeds`` (the pooled, projected embedding: SD3's pooled input)."""

    def __init__(self, clip: nn.Module, folder: Path) -> None:
        super().__init__()
        clip.visual = None  # the image tower is not needed here
        self.clip, self.folder = clip, folder
        width = clip.token_embedding.embedding_dim
        projection = clip.text_projection
        out_dim = projection.out_features if isinstance(projection, nn.Linear) else (
            projection.shape[1] if projection is not None else width)
        self.config = SimpleNamespace(hidden_size=width, projection_dim=out_dim)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor) -> Any:
        from open_clip.transformer import text_global_pool
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        clip = self.clip
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(input_ids).to(cast) + clip.positional_embedding.to(cast)
        states = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        pooled = text_global_pool(states, input_ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if isinstance(pooled, tuple):  # some open_clip versions return (pooled, tokens)
            pooled = pooled[0]
        if clip.text_projection is not None:
            pooled = clip.text_projection(pooled) if isinstance(clip.text_projection, nn.Linear) \
                else pooled @ clip.text_projection
        out = BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=pooled)
        out["text_embeds"] = pooled
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        """The clip run's files, so ``model.text_encoder.name_or_path=<this folder>`` loads it again."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in (CLIP_CONFIG, CLIP_WEIGHTS, CLIP_PREPROCESS):
            if (self.folder / name).exists():
                shutil.copyfile(self.folder / name, directory / name)


def load_text_tower(path: str | Path) -> tuple[OpenClipTextTower, OpenClipTokenizer]:
    """The frozen text tower of a clip run's ``final/`` and its tokenizer."""
    clip, preprocess, folder = load_clip_run(path, "model.text_encoder.name_or_path")
    return OpenClipTextTower(clip, folder), OpenClipTokenizer(preprocess)


class OpenClipImageFeatures(nn.Module):
    """The image tower of a clip run as a feature network for FID / KID: images in ``[0, 1]`` ->
    its (unnormalised) image embedding, after the clip run's resize and normalisation."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        clip, preprocess, _ = load_clip_run(path, "objective.evaluation.fid_features")
        self.visual = clip.visual
        self.image_size = int(preprocess["image_size"])
        mean = preprocess.get("mean") or [0.48145466, 0.4578275, 0.40821073]
        std = preprocess.get("std") or [0.26862954, 0.26130258, 0.27577711]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.num_features = int(getattr(self.visual, "output_dim", 0) or self._probe())
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _probe(self) -> int:
        return self.visual(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        return self.visual((x - self.mean) / self.std).float()
