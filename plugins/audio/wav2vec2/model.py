"""wav2vec 2.0 builder: a checkpoint (hub id or folder), or a tiny model from a config."""

from __future__ import annotations

from typing import Any

from modalforge.models import offline_hint


def build_wav2vec2(name_or_path: str | None = None, config: dict[str, Any] | None = None):  # noqa: ANN201
    """``Wav2Vec2ForPreTraining``: contrastive head + Gumbel quantizer on the feature encoder and transformer."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    if name_or_path:
        try:
            return Wav2Vec2ForPreTraining.from_pretrained(name_or_path)
        except Exception as err:  # noqa: BLE001
            raise offline_hint(name_or_path, err) from err
    settings = dict(config or {})
    for key in ("conv_dim", "conv_stride", "conv_kernel"):
        if key in settings:
            settings[key] = tuple(settings[key])
    return Wav2Vec2ForPreTraining(Wav2Vec2Config(**settings))
