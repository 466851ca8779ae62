"""audio_lm model: transformers' ``Qwen2AudioForConditionalGeneration``, three ways in, one model out.

- ``name_or_path``: a saved Qwen2-Audio folder or hub id (a previous audio_lm run's ``final/``);
- ``audio_encoder`` + ``language_model``: a whisper_asr run's ``final/`` (or any HF Whisper folder) and a
  causal_lm/sft run's ``final/`` (or any HF causal LM folder), joined LLaVA-style with a new projector;
- neither: a tiny twin from config (tiny Qwen2-Audio encoder, tiny causal LM of any ``model_type``).

``Qwen2AudioConfig.text_config`` is resolved with ``AutoConfig`` and the language model is built with
``AutoModel.from_config``, so any causal LM architecture transformers knows (llama, qwen2, mistral...)
may be the text side; the LM head lives on the outer model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.models import offline_hint

#: Fields of a ``WhisperConfig`` that a ``Qwen2AudioEncoderConfig`` has under the same name.
WHISPER_ENCODER_FIELDS = ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                          "encoder_layerdrop", "d_model", "dropout", "attention_dropout", "activation_function",
                          "activation_dropout", "scale_embedding", "init_std", "max_source_positions")


def load_whisper_encoder(path: str) -> nn.Module:
    """A ``Qwen2AudioEncoder`` holding the encoder weights of a Whisper folder (a whisper_asr run's ``final/``).

    ``Qwen2AudioEncoder`` is transformers' ``WhisperEncoder`` copied (its source says so) plus a parameter-free
    ``avg_pooler`` before the final ``layer_norm``; every parameter and buffer name matches one to one:
    ``conv1``, ``conv2``, ``embed_positions`` (Whisper's sinusoidal table, stored as weights),
    ``layers.<i>.{self_attn.{q,k,v,out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}`` and
    ``layer_norm``. The load is strict, so a name that did not match would be an error here, not a
    silently random layer. The outputs differ from Whisper's (pooled by 2 before the norm), as in Qwen2-Audio.
    """
    from transformers import Qwen2AudioEncoder, Qwen2AudioEncoderConfig, WhisperConfig, WhisperModel

    folder = str(Path(path).expanduser())
    try:
        whisper_config = WhisperConfig.from_pretrained(folder)
        encoder = WhisperModel.from_pretrained(folder).get_encoder()
    except Exception as err:  # noqa: BLE001
        raise offline_hint(path, err, what="audio encoder (Whisper)") from err
    settings = {k: getattr(whisper_config, k) for k in WHISPER_ENCODER_FIELDS if hasattr(whisper_config, k)}
    if "init_std" in settings:
        settings["initializer_range"] = settings.pop("init_std")
    tower = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**settings))
    try:
        tower.load_state_dict(encoder.state_dict(), strict=True)
    except RuntimeError as err:
        raise ModalforgeError(f"{folder}: Whisper encoder weights do not fit a Qwen2-Audio encoder: {err}") from None
    return tower


def _language_model(path: str, vocab_size: int | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(Path(path).expanduser()))
    except Exception as err:  # noqa: BLE001
        raise offline_hint(path, err, what="language model") from err
    if vocab_size and lm.get_input_embeddings().num_embeddings < vocab_size:
        lm.resize_token_embeddings(vocab_size)
    return lm


def join(tower: nn.Module, lm: nn.Module, audio_token_id: int) -> nn.Module:
    """A Qwen2-Audio around an existing encoder and causal LM, with a new projector.

    Built on the meta device, then the real parts put in. Qwen2-Audio declares no tied weights, so a
    tied LM head is untied (copied) to save and reload as two tensors with the same values."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioMultiModalProjector

    text = lm.config.to_dict()
    text["tie_word_embeddings"] = False
    config = Qwen2AudioConfig(audio_config=tower.config.to_dict(), text_config=text, audio_token_index=audio_token_id)
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    model.model.audio_tower = tower
    model.model.language_model = lm.get_decoder()
    head = lm.get_output_embeddings()
    if head.weight is lm.get_input_embeddings().weight:
        head = nn.Linear(head.in_features, head.out_features, bias=False)
        head.weight = nn.Parameter(lm.get_input_embeddings().weight.detach().clone())
    model.lm_head = head
    model.model.multi_modal_projector = Qwen2AudioMultiModalProjector(config).to(next(lm.parameters()).dtype)
    model.config.text_config.tie_word_embeddings = False
    return model


def build_audio_lm(name_or_path: str | None = None, audio_encoder: str | None = None,
                   language_model: str | None = None, audio: dict[str, Any] | None = None,
                   text: dict[str, Any] | None = None, freeze_audio_encoder: bool = True, dtype: str | None = None,
                   audio_token_id: int | None = None, vocab_size: int | None = None, pad_token_id: int | None = None,
                   bos_token_id: int | None = None, eos_token_id: int | None = None,
                   num_mel_bins: int | None = None, max_source_positions: int | None = None) -> nn.Module:
    """A ``Qwen2AudioForConditionalGeneration``.

    Args:
        name_or_path: a Qwen2-Audio folder or hub id; loaded as is (embeddings grown to the tokenizer).
        audio_encoder / language_model: a Whisper folder and a causal LM folder (see :func:`load_whisper_encoder`).
        audio: tiny encoder sizes (``Qwen2AudioEncoderConfig`` fields) when no encoder is given.
        text: tiny LM config (``model_type`` + fields) when no language model is given.
        freeze_audio_encoder: read by the objective (``objective.freeze_audio_encoder``), not here.
        dtype: torch dtype name of the model.
        audio_token_id / vocab_size / *_token_id / num_mel_bins / max_source_positions: from the data (hints).
    """
    from transformers import AutoConfig, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    torch_dtype = getattr(torch, dtype) if dtype else None
    if name_or_path:
        try:
            model = Qwen2AudioForConditionalGeneration.from_pretrained(
                str(Path(name_or_path).expanduser()) if Path(name_or_path).expanduser().exists() else name_or_path,
                **({"dtype": torch_dtype} if torch_dtype else {}))
        except Exception as err:  # noqa: BLE001
            raise offline_hint(name_or_path, err, what="audio-language model") from err
        if vocab_size and model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    if audio_token_id is None:
        raise ModalforgeError("build_audio_lm needs audio_token_id (the DataModule adds the audio token)")
    if bool(audio_encoder) != bool(language_model):
        raise ModalforgeError("model.audio_encoder and model.language_model go together (or give model.name_or_path)")
    if audio_encoder:
        model = join(load_whisper_encoder(audio_encoder), _language_model(language_model, vocab_size), audio_token_id)
        return model.to(torch_dtype) if torch_dtype else model
    settings = dict(text or {})
    ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
           "vocab_size": vocab_size}
    settings.update({k: v for k, v in ids.items() if v is not None})
    settings["tie_word_embeddings"] = False
    text_config = AutoConfig.for_model(settings.pop("model_type", "llama"), **settings)
    encoder = {"model_type": "qwen2_audio_encoder", "d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 2,
               "encoder_ffn_dim": 128, **dict(audio or {})}
    encoder.update({k: v for k, v in {"num_mel_bins": num_mel_bins,
                                      "max_source_positions": max_source_positions}.items() if v is not None})
    config = Qwen2AudioConfig(audio_config=encoder, text_config=text_config.to_dict(), audio_token_index=audio_token_id)
    model = Qwen2AudioForConditionalGeneration(config)
    return model.to(torch_dtype) if torch_dtype else model
