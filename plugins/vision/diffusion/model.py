"""Model builders for diffusion: diffusers denoisers built from a config, or a pretrained pipeline folder.

From scratch (``model.name_or_path=null``): a ``UNet2DModel`` (unconditional, or class-conditional
through its ``num_class_embeds``) or, for text conditioning, a ``UNet2DConditionModel`` with a
frozen ``transformers.CLIPTextModel`` built from ``model.text_encoder``; with ``model.vae`` a
frozen ``AutoencoderKL`` (built from its config, or ``model.vae.name_or_path`` a VAE folder)
and the UNet works on its latents. Pretrained (``model.name_or_path=<pipeline folder or hub id>``):
the pipeline's own UNet, VAE, text encoder, tokenizer and scheduler config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from modalforge.errors import ModalforgeError, ModelLoadError
from modalforge.models import offline_hint
from modalforge.plugins.vision.diffusion.denoisers import (DenoiserKind, PipelinePromptEncoder,
                                                             build_transformer, input_multiple)

log = logging.getLogger(__name__)


@dataclass
class DiffusionModels:
    """What the Objective needs: the trained denoiser and its frozen helpers.

    Args:
        denoiser: the network that predicts noise / velocity / the clean sample.
        vae: frozen ``AutoencoderKL`` for latent diffusion, ``None`` in pixel space.
        text_encoder: frozen text encoder for text conditioning.
        tokenizer: the pretrained pipeline's tokenizer (``None``: the DataModule's).
        scheduler_config: the pretrained pipeline's scheduler config (``None``: built from the objective).
        source: the pipeline folder or hub id the models came from.
    """

    denoiser: nn.Module
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    scheduler_config: dict[str, Any] | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _block_types(levels: list[bool], cross: bool) -> tuple[list[str], list[str]]:
    attn_down = "CrossAttnDownBlock2D" if cross else "AttnDownBlock2D"
    attn_up = "CrossAttnUpBlock2D" if cross else "AttnUpBlock2D"
    down = [attn_down if a else "DownBlock2D" for a in levels]
    up = [attn_up if a else "UpBlock2D" for a in reversed(levels)]
    return down, up


def vae_scale_factor(vae: nn.Module | None) -> int:
    """How much the VAE shrinks each side (8 for Stable Diffusion's); 1 in pixel space."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(image_size: int, vae: nn.Module | None, down_levels: int = 1, multiple: int | None = None,
                     what: str = "UNet") -> None:
    """A ``ModalforgeError`` naming ``data.image_size`` if the VAE or the denoiser cannot divide it.

    The denoiser's input side must be a multiple of ``multiple`` (a transformer's patch size),
    or of ``2^(down_levels-1)`` (a UNet halves it at each level but the last).
    """
    factor = vae_scale_factor(vae)
    if image_size % factor:
        raise ModalforgeError(f"data.image_size={image_size} is not divisible by the VAE's downsampling factor "
                              f"{factor}; use a multiple of {factor} (e.g. {max(factor, image_size // factor * factor)})")
    latent = image_size // factor
    if multiple is None:
        multiple = 2 ** max(down_levels - 1, 0)
        reason = f"the UNet's {down_levels} resolution levels cannot halve {down_levels - 1} times"
    else:
        reason = f"the {what}'s patch size {multiple} does not divide"
    if latent % multiple:
        raise ModalforgeError(f"data.image_size={image_size} gives a {latent}x{latent} denoiser input that {reason}; "
                              f"use a multiple of {factor * multiple}")


def build_vae(vae: dict[str, Any] | None) -> nn.Module | None:
    """``AutoencoderKL`` from ``name_or_path`` (a VAE folder, or a pipeline folder's ``vae/``) or from its config."""
    if not vae:
        return None
    from diffusers import AutoencoderKL

    cfg = dict(vae)
    source = cfg.pop("name_or_path", None)
    if source:
        subfolder = "vae" if (Path(source) / "vae" / "config.json").exists() else None
        try:
            return AutoencoderKL.from_pretrained(source, subfolder=subfolder)
        except Exception as err:  # noqa: BLE001
            raise offline_hint(source, err, what="VAE") from err
    settings = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [32, 64],
                "layers_per_block": 1, "norm_num_groups": 8,
                "down_block_types": None, "up_block_types": None, **cfg}
    levels = len(settings["block_out_channels"])
    settings["down_block_types"] = settings["down_block_types"] or ["DownEncoderBlock2D"] * levels
    settings["up_block_types"] = settings["up_block_types"] or ["UpDecoderBlock2D"] * levels
    return AutoencoderKL(**settings)


def build_text_encoder(config: dict[str, Any] | None, vocab_size: int | None, context_length: int,
                       tokenizer: Any = None, with_projection: bool = False) -> nn.Module:
    """A small ``CLIPTextModel`` from config (random weights: it is frozen, so it acts as a fixed
    embedding of the caption; point ``model.name_or_path`` at a pipeline for a trained one).
    ``with_projection``: ``CLIPTextModelWithProjection``, whose pooled ``text_embeds`` SD3 reads."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    settings = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                **(config or {})}
    special = {}
    if tokenizer is not None:
        special = {k: getattr(tokenizer, f"{k}") for k in ("pad_token_id", "bos_token_id", "eos_token_id")
                   if getattr(tokenizer, k, None) is not None}
    settings.setdefault("projection_dim", settings["hidden_size"])
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(vocab_size=vocab_size or 49408, max_position_embeddings=context_length,
                              **special, **settings))


def text_encoder_for(config: dict[str, Any] | None, vocab_size: int | None, context_length: int,
                     tokenizer: Any = None, with_projection: bool = False) -> tuple[nn.Module, Any]:
    """The frozen text encoder and, when it brings one, its tokenizer (``None``: the data's).

    ``model.text_encoder.name_or_path`` names a ``clip`` run's ``final/`` (its text tower and
    open_clip tokenizer) or a ``transformers`` CLIP text model folder (a pipeline's
    ``text_encoder/``, with the ``tokenizer/`` beside it); otherwise one is built from the config.
    """
    cfg = dict(config or {})
    source = cfg.pop("name_or_path", None)
    if not source:
        return build_text_encoder(cfg, vocab_size, context_length, tokenizer, with_projection), None
    from modalforge.plugins.vision.diffusion.clip_towers import is_clip_run, load_text_tower

    if is_clip_run(source):
        return load_text_tower(source)
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(source).expanduser()
    if (folder / "text_encoder" / "config.json").exists():
        folder = folder / "text_encoder"
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    try:
        encoder = cls.from_pretrained(str(folder))
        tok_folder = folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() else folder
        return encoder, AutoTokenizer.from_pretrained(str(tok_folder))
    except Exception as err:  # noqa: BLE001
        raise offline_hint(str(source), err, what="text encoder (model.text_encoder.name_or_path)") from err


def load_pipeline(name_or_path: str) -> Any:
    """A diffusers pipeline from a local folder (which must hold ``model_index.json``) or a hub id."""
    from diffusers import DiffusionPipeline

    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"model.name_or_path={name_or_path!r} is not a diffusers pipeline folder: "
                                 f"{path / 'model_index.json'} is missing (save one with pipeline.save_pretrained, "
                                 "or use a diffusion run's final/)")
        # Components saved as [null, null] (SD3 without its T5) must be passed as None to load.
        index = json.loads((path / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v[:1] == [None]}
        try:
            return DiffusionPipeline.from_pretrained(str(path), **absent)
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"model.name_or_path={name_or_path!r}: cannot load the diffusers pipeline: "
                                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    try:
        return DiffusionPipeline.from_pretrained(name_or_path)
    except Exception as err:  # noqa: BLE001
        raise offline_hint(name_or_path, err, what="diffusers pipeline") from err


def build_diffusion(name_or_path: str | None = None, denoiser: DenoiserKind = "unet",
                    unet: dict[str, Any] | None = None, transformer: dict[str, Any] | None = None,
                    vae: dict[str, Any] | None = None, text_encoder: dict[str, Any] | None = None,
                    image_size: int = 32, num_classes: int = 0,
                    conditioning: Literal["none", "class", "text"] = "none", vocab_size: int | None = None,
                    context_length: int = 16, tokenizer: Any = None) -> DiffusionModels:
    """The denoiser and its helpers (see the module docstring).

    Args:
        name_or_path: a diffusers pipeline folder or hub id; ``None`` builds from the configs below.
        denoiser: ``unet`` (``UNet2DModel`` / ``UNet2DConditionModel``), ``dit``
            (``DiTTransformer2DModel``, class-conditional) or ``sd3`` (``SD3Transformer2DModel``, text).
        unet: ``UNet2DModel`` / ``UNet2DConditionModel`` arguments. ``attention`` (one bool per
            resolution level) picks attention blocks when no ``down_block_types`` are given.
        transformer: ``DiTTransformer2DModel`` / ``SD3Transformer2DModel`` arguments (sizes, layers,
            patch size); the input size, channels, classes and text widths come from the data.
        vae: ``AutoencoderKL`` arguments, or ``{name_or_path: <folder>}``; ``None``: pixel space.
        text_encoder: ``CLIPTextConfig`` arguments for text conditioning, or ``{name_or_path: <folder>}``:
            a ``clip`` run's ``final/`` (its text tower) or a ``transformers`` CLIP text model folder.
        image_size, num_classes, conditioning, vocab_size, context_length, tokenizer: from the data (hints).
    """
    if name_or_path:
        return _from_pipeline(name_or_path, image_size, conditioning)
    from diffusers import UNet2DConditionModel, UNet2DModel

    vae_model = build_vae(vae)
    channels = vae_model.config.latent_channels if vae_model is not None else 3
    size = image_size // vae_scale_factor(vae_model)
    if denoiser != "unet":
        return _transformer_models(denoiser, transformer, vae_model, text_encoder, image_size=image_size,
                                   channels=channels, num_classes=num_classes, conditioning=conditioning,
                                   vocab_size=vocab_size, context_length=context_length, tokenizer=tokenizer)
    settings = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8, **(unet or {})}
    attention = list(settings.pop("attention", [False] * (len(settings["block_out_channels"]) - 1) + [True]))
    if len(attention) != len(settings["block_out_channels"]):
        raise ModalforgeError(f"model.unet.attention has {len(attention)} entries; it needs one per "
                              f"block_out_channels entry ({len(settings['block_out_channels'])})")
    check_resolution(image_size, vae_model, len(settings["block_out_channels"]))
    down, up = _block_types(attention, cross=conditioning == "text")
    settings.setdefault("down_block_types", down)
    settings.setdefault("up_block_types", up)
    common = {"sample_size": size, "in_channels": channels, "out_channels": channels}
    if conditioning == "text":
        encoder, text_tokenizer = text_encoder_for(text_encoder, vocab_size, context_length, tokenizer)
        settings.setdefault("attention_head_dim", 8)
        denoiser_model = UNet2DConditionModel(**common, cross_attention_dim=encoder.config.hidden_size, **settings)
        return DiffusionModels(denoiser_model, vae=vae_model, text_encoder=encoder, tokenizer=text_tokenizer)
    if conditioning == "class":
        if num_classes < 1:
            raise ModalforgeError("objective.conditioning.kind=class needs labelled data (data.label_field); none found")
        settings["num_class_embeds"] = num_classes + 1  # + the null class of classifier-free guidance
    return DiffusionModels(UNet2DModel(**common, **settings), vae=vae_model)


def _transformer_models(kind: DenoiserKind, transformer: dict[str, Any] | None, vae_model: nn.Module | None,
                        text_encoder: dict[str, Any] | None, *, image_size: int, channels: int, num_classes: int,
                        conditioning: str, vocab_size: int | None, context_length: int,
                        tokenizer: Any) -> DiffusionModels:
    settings = dict(transformer or {})
    check_resolution(image_size, vae_model, multiple=int(settings.get("patch_size", 2)),
                     what=f"model.transformer ({kind})")
    encoder, text_tokenizer = None, None
    if kind == "sd3" and conditioning == "text":
        encoder, text_tokenizer = text_encoder_for(text_encoder, vocab_size, context_length, tokenizer,
                                                   with_projection=True)
    denoiser = build_transformer(kind, settings, sample_size=image_size // vae_scale_factor(vae_model),
                                 channels=channels, conditioning=conditioning, num_classes=num_classes,
                                 text_dim=encoder.config.hidden_size if encoder is not None else None,
                                 pooled_dim=encoder.config.projection_dim if encoder is not None else None)
    return DiffusionModels(denoiser, vae=vae_model, text_encoder=encoder, tokenizer=text_tokenizer)


def _from_pipeline(name_or_path: str, image_size: int, conditioning: str) -> DiffusionModels:
    pipe = load_pipeline(name_or_path)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        raise ModelLoadError(f"model.name_or_path={name_or_path!r}: the pipeline {type(pipe).__name__} has no "
                             "unet or transformer to train")
    vae = getattr(pipe, "vae", None)
    text_encoder = getattr(pipe, "text_encoder", None)
    if conditioning == "text" and text_encoder is None:
        raise ModelLoadError(f"model.name_or_path={name_or_path!r} has no text_encoder; objective.conditioning.kind=text "
                             "needs one (or use conditioning=none / class)")
    if conditioning == "text" and type(denoiser).__name__ == "SD3Transformer2DModel":
        text_encoder = PipelinePromptEncoder(pipe)  # SD3 reads two CLIPs (+ T5) through encode_prompt
    if getattr(denoiser.config, "patch_size", None):
        check_resolution(image_size, vae, multiple=input_multiple(denoiser), what=type(denoiser).__name__)
    else:
        check_resolution(image_size, vae, len(getattr(denoiser.config, "block_out_channels", []) or [1]))
    return DiffusionModels(denoiser, vae=vae, text_encoder=text_encoder if conditioning == "text" else None,
                           tokenizer=getattr(pipe, "tokenizer", None), scheduler_config=dict(pipe.scheduler.config),
                           source=name_or_path)
