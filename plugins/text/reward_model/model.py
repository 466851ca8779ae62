"""Reward model builder: a causal LM body with a scalar head (``AutoModelForSequenceClassification``)."""

from __future__ import annotations

from typing import Any

from modalforge.models import check_hub, offline_hint


def build_reward_model(name_or_path: str | None = None, config: dict[str, Any] | None = None,
                       vocab_size: int | None = None, pad_token_id: int | None = None,
                       trust_remote_code: bool = False, dtype: str | None = None,
                       attn_implementation: str | None = None):  # noqa: ANN201
    """A sequence classifier with one output, scored at the last non-padding token.

    ``name_or_path`` may be a causal LM (an sft run's ``final/``): its body is kept and
    a new scalar ``score`` head is added. ``dtype`` / ``attn_implementation``: as a ``model=preset/<family>``
    sets them for a causal LM.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    loading: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype:
        loading["dtype"] = dtype
    if attn_implementation:
        loading["attn_implementation"] = attn_implementation
    if name_or_path:
        check_hub(name_or_path)  # no network: seconds, not a minute of retries
        try:
            model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, **loading)
        except Exception as err:  # noqa: BLE001
            raise offline_hint(name_or_path, err) from err
        if vocab_size and model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        settings = dict(config or {})
        model_type = settings.pop("model_type", "llama")
        if vocab_size:
            settings["vocab_size"] = vocab_size
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.for_model(model_type, num_labels=1, **settings),
            **{k: v for k, v in loading.items() if k == "attn_implementation"})
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # the head pools at the last non-pad token
    return model
