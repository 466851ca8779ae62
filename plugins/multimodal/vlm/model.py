"""vlm model: ``LlavaForConditionalGeneration`` from a config, a LLaVA folder, or two pretrained parts;
any other ``AutoModelForImageTextToText`` family from its folder, or as its tiny twin (:mod:`.families`).

Three ways in, one model out (plain transformers LLaVA, so ``final/`` loads anywhere):

- ``name_or_path``: a LLaVA folder (a previous vlm run's ``final/``, e.g. stage 1 -> stage 2);
- ``vision_tower`` + ``language_model``: a ``clip`` run's ``final/`` (open_clip weights, converted here
  into an HF ``CLIPVisionModel``) or any HF CLIP/SigLIP (vision) folder, and a ``causal_lm``/``sft``
  run's ``final/`` or any HF causal LM folder; the projector is new;
- neither: a tiny tower (the clip plugin's tiny tower sizes) and a tiny Llama, from config.

The tokenizer's image token arrives as a hint (``image_token_id``, ``vocab_size``) and the
language model's embeddings are resized to hold it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.models import offline_hint

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"


# ---- vision towers ------------------------------------------------------------------------
def clip_vision_config(vision: dict[str, Any], image_size: int, quick_gelu: bool = False) -> Any:
    """An HF ``CLIPVisionConfig`` from open_clip ``CLIPVisionCfg`` fields (``layers``, ``width``...)."""
    from transformers import CLIPVisionConfig

    width = int(vision.get("width", 64))
    return CLIPVisionConfig(hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
                            num_hidden_layers=int(vision.get("layers", 2)),
                            num_attention_heads=width // int(vision.get("head_width", 64)),
                            patch_size=int(vision.get("patch_size", 16)), image_size=int(image_size),
                            hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5)


def open_clip_to_hf_state(visual: dict[str, torch.Tensor], layers: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename an open_clip ``VisionTransformer`` state dict into ``CLIPVisionModel`` keys.

    Hand-written: transformers ships this mapping only as a conversion script, not an importable function.
    ``nn.MultiheadAttention``'s fused ``in_proj`` splits into q/k/v; ``proj`` (the contrastive head) is dropped.
    """
    out = {"embeddings.class_embedding": visual["class_embedding"],
           "embeddings.patch_embedding.weight": visual["conv1.weight"],
           "embeddings.position_embedding.weight": visual["positional_embedding"],
           "pre_layrnorm.weight": visual["ln_pre.weight"],
           "pre_layrnorm.bias": visual["ln_pre.bias"],
           "post_layernorm.weight": visual["ln_post.weight"],
           "post_layernorm.bias": visual["ln_post.bias"]}
    out = {f"{prefix}{k}": v for k, v in out.items()}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"{prefix}encoder.layers.{i}."
        for name, value in zip(("q_proj", "k_proj", "v_proj"), visual[src + "attn.in_proj_weight"].chunk(3)):
            out[f"{dst}self_attn.{name}.weight"] = value
        for name, value in zip(("q_proj", "k_proj", "v_proj"), visual[src + "attn.in_proj_bias"].chunk(3)):
            out[f"{dst}self_attn.{name}.bias"] = value
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            out[f"{dst}{b}.weight"] = visual[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = visual[f"{src}{a}.bias"]
    return out


def _open_clip_settings(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / OPEN_CLIP_CONFIG).read_text())["kwargs"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise ModalforgeError(f"{folder / OPEN_CLIP_CONFIG}: unreadable clip run config ({err})") from None


def vision_geometry(path: str) -> dict[str, Any]:
    """``image_size``, ``patch_size``, LLaVA feature strategy and CLS token of a tower folder, without its weights."""
    folder = Path(path).expanduser()
    if (folder / OPEN_CLIP_CONFIG).exists():
        settings = _open_clip_settings(folder)
        if settings.get("name"):
            raise ModalforgeError(f"{folder}: a clip run of the named open_clip architecture {settings['name']!r}; "
                                  "only custom (model=clip/tiny-style) towers convert; export that architecture "
                                  "to Hugging Face format and point model.vision_tower at it")
        return {"image_size": int(settings.get("image_size") or 224),
                "patch_size": int((settings.get("vision") or {}).get("patch_size", 16)), "strategy": "default",
                "cls": True}
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001
        raise offline_hint(str(path), err, what="vision tower") from err
    vision = getattr(config, "vision_config", None) or config
    strategy = "full" if "siglip" in vision.model_type else "default"  # SigLIP has no CLS token to drop
    return {"image_size": int(vision.image_size), "patch_size": int(vision.patch_size), "strategy": strategy,
            "cls": "siglip" not in vision.model_type}


def load_vision_tower(path: str) -> nn.Module:
    """An HF vision model from a clip run's ``final/`` (converted) or an HF CLIP/SigLIP (vision) folder."""
    folder = Path(path).expanduser()
    if (folder / OPEN_CLIP_CONFIG).exists():
        from safetensors.torch import load_file
        from transformers import CLIPVisionModel

        settings = _open_clip_settings(folder)
        geometry = vision_geometry(path)
        vision = dict(settings.get("vision") or {})
        config = clip_vision_config(vision, geometry["image_size"], quick_gelu=bool(settings.get("quick_gelu")))
        state = load_file(str(folder / OPEN_CLIP_WEIGHTS))
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        tower = CLIPVisionModel(config)
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
        missing, unexpected = tower.load_state_dict(open_clip_to_hf_state(visual, config.num_hidden_layers, prefix),
                                                    strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise ModalforgeError(f"{folder}: open_clip tower does not convert (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
        return tower
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    try:
        config = AutoConfig.from_pretrained(str(folder))
        model_class = SiglipVisionModel if "siglip" in config.model_type else CLIPVisionModel
        return model_class.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001
        raise offline_hint(str(path), err, what="vision tower") from err


# ---- language models ----------------------------------------------------------------------
def _resize(lm: nn.Module, vocab_size: int | None) -> None:
    if vocab_size and lm.get_input_embeddings().num_embeddings < vocab_size:
        lm.resize_token_embeddings(vocab_size)


def load_language_model(path: str, vocab_size: int | None, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(Path(path).expanduser()), **({"dtype": dtype} if dtype else {}))
    except Exception as err:  # noqa: BLE001
        raise offline_hint(str(path), err, what="language model") from err
    _resize(lm, vocab_size)
    return lm


# ---- the joined model ---------------------------------------------------------------------
def _join(tower: nn.Module, lm: nn.Module, *, image_token_id: int, projector_hidden_act: str,
          vision_feature_layer: int, strategy: str) -> nn.Module:
    """A LLaVA around an existing tower and LM: built on the meta device, then the real parts put in."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(vision_config=tower.config.to_dict(), text_config=lm.config.to_dict(),
                         image_token_id=image_token_id, projector_hidden_act=projector_hidden_act,
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
                         tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    model.lm_head = lm.get_output_embeddings()
    projector = LlavaMultiModalProjector(config)
    model.model.multi_modal_projector = projector.to(next(lm.parameters()).dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.get_input_embeddings().weight
    return model


def build_vlm(name_or_path: str | None = None, vision_tower: str | None = None, language_model: str | None = None,
              vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None,
              projector_hidden_act: str = "gelu", vision_feature_layer: int = -2,
              vision_feature_select_strategy: Literal["default", "full"] | None = None,
              image_size: int | None = None, image_token_id: int | None = None, vocab_size: int | None = None,
              pad_token_id: int | None = None, bos_token_id: int | None = None, eos_token_id: int | None = None,
              dtype: str | None = None, warmstart: dict[str, Any] | None = None,
              cache_dir: str | None = None, family: str | None = None, processor: Any = None,
              quantization_config: Any = None, freeze_vision_tower: bool | None = None,
              image_processor: dict[str, Any] | None = None) -> nn.Module:
    """A ``LlavaForConditionalGeneration``, or any ``AutoModelForImageTextToText`` family.

    Args:
        name_or_path: a LLaVA folder (a previous run's ``final/``); ``vision_tower`` / ``language_model``
            may replace one of its parts.
        vision_tower: a clip run's ``final/`` or an HF CLIP/SigLIP (vision) model folder.
        language_model: a causal_lm/sft run's ``final/`` or an HF causal LM folder.
        vision: tiny tower sizes (open_clip ``CLIPVisionCfg`` fields), used when no tower is given.
        text: tiny LM config (``model_type`` + fields), used when no language model is given.
        projector_hidden_act / vision_feature_layer / vision_feature_select_strategy: LLaVA settings
            (strategy ``None``: ``full`` for SigLIP, ``default`` - drop CLS - otherwise).
        image_size / image_token_id / vocab_size / *_token_id: from the data (hints).
        dtype: torch dtype name for loaded parts.
        family: a :mod:`.families` name: with no ``name_or_path``, that family's tiny twin from config
            (``text`` may shrink or grow its language model), on the data's ``processor`` (a hint).
        quantization_config: from ``adapter=qlora``, for a hub family loaded in 4 bits.
        freeze_vision_tower / image_processor: a preset's defaults, read by the objective
            (``objective.freeze_vision_tower``) and the data (``data.image_processor``), not here.
        warmstart: for the tiny tower from ``vision``: pretrain it on the shapes first (``steps``, ``lr``,
            ``batch_size``, ``seed``; built once, cached under ``cache_dir``: :mod:`.warmstart`); ``None``: random.
            (Its ``freeze`` key is read by the objective's config, not here.)
    """
    torch_dtype = getattr(torch, dtype) if dtype else None
    if image_token_id is None:
        raise ModalforgeError("build_vlm needs image_token_id (the DataModule adds the image token to the tokenizer)")
    if name_or_path and not _is_llava(name_or_path):
        return _image_text_to_text(name_or_path, vocab_size, torch_dtype, quantization_config)
    if name_or_path:
        return _from_llava_folder(name_or_path, vision_tower, language_model, vocab_size, torch_dtype)
    if family:
        return _tiny_twin(family, processor, dict(text or {}))
    if vision_tower:
        tower = load_vision_tower(vision_tower)
        strategy = vision_feature_select_strategy or vision_geometry(vision_tower)["strategy"]
    else:
        from transformers import CLIPVisionModel

        if warmstart:
            from modalforge.plugins.multimodal.vlm.warmstart import pretrained_tower_dir

            settings = {k: v for k, v in dict(warmstart).items() if k != "freeze"}
            tower = CLIPVisionModel.from_pretrained(str(pretrained_tower_dir(
                dict(vision or {}), image_size or 32, cache_dir=cache_dir, **settings)))
        else:
            tower = CLIPVisionModel(clip_vision_config(dict(vision or {}), image_size or 32))
        strategy = vision_feature_select_strategy or "default"
    if language_model:
        lm = load_language_model(language_model, vocab_size, torch_dtype)
    else:
        from modalforge.text.models import build_causal_lm

        lm = build_causal_lm(config=dict(text or {}), vocab_size=vocab_size, pad_token_id=pad_token_id,
                             bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if torch_dtype is not None:
        tower = tower.to(torch_dtype)
    return _join(tower, lm, image_token_id=image_token_id, projector_hidden_act=projector_hidden_act,
                 vision_feature_layer=vision_feature_layer, strategy=strategy)


def _is_llava(path: str) -> bool:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(Path(path).expanduser())).model_type == "llava"
    except Exception as err:  # noqa: BLE001
        raise offline_hint(path, err, what="vision-language model") from err


def _image_text_to_text(path: str, vocab_size: int | None, dtype: torch.dtype | None,
                        quantization_config: Any = None) -> nn.Module:
    """Any family transformers maps to ``AutoModelForImageTextToText`` (Qwen2-VL, Gemma 3, Idefics3...)."""
    from transformers import AutoModelForImageTextToText

    try:
        kwargs = {"dtype": dtype} if dtype else {}
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        model = AutoModelForImageTextToText.from_pretrained(str(Path(path).expanduser()), **kwargs)
    except Exception as err:  # noqa: BLE001
        raise offline_hint(path, err, what="image-text-to-text model") from err
    if vocab_size and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def _tiny_twin(name: str, processor: Any, sizes: dict[str, Any]) -> nn.Module:
    """A family's shrunk model on the data's processor (offline runs and tests)."""
    from transformers import AutoModelForImageTextToText

    from modalforge.plugins.multimodal.vlm.families import family

    if processor is None:
        raise ModalforgeError(f"model.family={name}: the tiny twin needs the data's processor (data.family={name})")
    return AutoModelForImageTextToText.from_config(family(name).tiny_config(processor, sizes))


def _from_llava_folder(path: str, vision_tower: str | None, language_model: str | None, vocab_size: int | None,
                       dtype: torch.dtype | None) -> nn.Module:
    from transformers import LlavaForConditionalGeneration

    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(Path(path).expanduser()),
                                                              **({"dtype": dtype} if dtype else {}))
    except Exception as err:  # noqa: BLE001
        raise offline_hint(path, err, what="LLaVA model") from err
    projector = model.model.multi_modal_projector
    if vision_tower:
        tower = load_vision_tower(vision_tower)
        if tower.config.hidden_size != projector.linear_1.in_features:
            raise ModalforgeError(f"model.vision_tower={vision_tower}: its hidden size {tower.config.hidden_size} "
                                  f"does not match the projector of {path}, which takes "
                                  f"{projector.linear_1.in_features}; train a new projector (leave model.name_or_path "
                                  "null and give model.vision_tower and model.language_model)")
        model.model.vision_tower = tower
        model.config.vision_config = tower.config
    if language_model:
        lm = load_language_model(language_model, vocab_size, dtype)
        if lm.config.hidden_size != projector.linear_2.out_features:
            raise ModalforgeError(f"model.language_model={language_model}: its hidden size {lm.config.hidden_size} "
                                  f"does not match the projector of {path} ({projector.linear_2.out_features})")
        model.model.language_model = lm.get_decoder()
        model.lm_head = lm.get_output_embeddings()
        model.config.text_config = lm.config
    if vocab_size and model.get_input_embeddings().num_embeddings < vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model
