"""Whisper builder: a checkpoint (hub id or folder), or a tiny model from a config."""

from __future__ import annotations

from typing import Any

from modalforge.models import offline_hint


def build_whisper(name_or_path: str | None = None, config: dict[str, Any] | None = None,
                  vocab_size: int | None = None, pad_token_id: int | None = None,
                  decoder_start_token_id: int | None = None, eos_token_id: int | None = None,
                  num_mel_bins: int | None = None, max_source_positions: int | None = None):  # noqa: ANN201
    """``WhisperForConditionalGeneration``; from scratch, sizes come from ``config`` and the data (hints)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if name_or_path:
        try:
            return WhisperForConditionalGeneration.from_pretrained(name_or_path)
        except Exception as err:  # noqa: BLE001
            raise offline_hint(name_or_path, err) from err
    settings = {"d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
                "decoder_attention_heads": 2, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                "max_target_positions": 64, **(config or {})}
    hints = {"vocab_size": vocab_size, "pad_token_id": pad_token_id, "decoder_start_token_id": decoder_start_token_id,
             "bos_token_id": decoder_start_token_id, "eos_token_id": eos_token_id, "num_mel_bins": num_mel_bins,
             "max_source_positions": max_source_positions}
    settings.update({k: v for k, v in hints.items() if v is not None})
    return WhisperForConditionalGeneration(WhisperConfig(**settings))
