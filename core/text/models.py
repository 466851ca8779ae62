"""Model builder for causal_lm: a hub/local checkpoint, or a fresh model from a config."""

from __future__ import annotations

from typing import Any

import torch

from modalforge.adapters.stages import adapter_folder, config_source, load_adapter_stage
from modalforge.errors import ConfigError
from modalforge.models import check_hub, offline_hint


def build_causal_lm(name_or_path: str | None = None, config: dict[str, Any] | None = None,
                    vocab_size: int | None = None, pad_token_id: int | None = None,
                    bos_token_id: int | None = None, eos_token_id: int | None = None,
                    dtype: str | None = None, trust_remote_code: bool = False,
                    attn_implementation: str | None = None, quantization_config: Any = None,
                    resume_adapter: bool = False):  # noqa: ANN201
    """``AutoModelForCausalLM`` from ``name_or_path``, or from ``config`` (a dict with ``model_type``).

    ``vocab_size`` and the special token ids come from the tokenizer (hints) when
    building from scratch; a loaded model gets its embeddings resized if the
    tokenizer is larger. ``name_or_path`` may be an earlier stage's PEFT adapter folder: its base
    is loaded and the adapter merged, or kept trainable with ``resume_adapter`` (``adapter.resume``;
    see :mod:`modalforge.adapters.stages`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        # torch raises this only at the first backward, after data and model are built
        raise ConfigError("FlexAttention has no backward pass on CPU, so it cannot train here",
                          where="model.attn_implementation",
                          hint="use sdpa on CPU (packed rows stay apart through their position ids), "
                               "flex_attention or flash_attention_2 on a GPU")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    folder = adapter_folder(name_or_path)
    if folder is not None:
        base_kwargs = {"vocab_size": vocab_size, "dtype": dtype, "trust_remote_code": trust_remote_code,
                       "attn_implementation": attn_implementation, "quantization_config": quantization_config}
        return load_adapter_stage(folder, build_causal_lm, resume=resume_adapter, base_kwargs=base_kwargs)
    if name_or_path:
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        check_hub(name_or_path)  # no network: seconds, not a minute of retries
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise offline_hint(name_or_path, err) from err
        if vocab_size and model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    settings = dict(config or {})
    model_type = settings.pop("model_type", "llama")
    ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    settings.update({k: v for k, v in ids.items() if v is not None})
    if vocab_size:
        settings["vocab_size"] = vocab_size
    model_config = AutoConfig.for_model(model_type, **settings)
    return AutoModelForCausalLM.from_config(model_config, **{k: v for k, v in kwargs.items() if k != "trust_remote_code"})


def block_classes_for(model_cfg: dict[str, Any]) -> set[type]:
    """Transformer block classes of the model a config would build (``_no_split_modules``), without building it."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if model_cfg.get("name_or_path"):
            check_hub(model_cfg["name_or_path"])  # unreachable: no hint, at once (the load then says why)
            config = AutoConfig.from_pretrained(config_source(model_cfg["name_or_path"]),
                                                trust_remote_code=bool(model_cfg.get("trust_remote_code")))
        else:
            settings = dict(model_cfg.get("config") or {})
            config = AutoConfig.for_model(settings.pop("model_type", "llama"), **settings)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - unknown configs just get no auto-wrap hint
        return set()
    module = sys.modules[model_class.__module__]
    names = getattr(model_class, "_no_split_modules", None) or []
    return {getattr(module, name) for name in names if hasattr(module, name)}
