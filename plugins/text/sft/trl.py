"""sft's ``trl_config=``: a TRL ``SFTConfig`` file, read through the shared mapping in ``modalforge.cli.trl_config``."""

from __future__ import annotations

from typing import Any

from modalforge.cli.trl_config import Context, TrlPlugin, direct, max_length, must_be, override


def _completion_only(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value is None:
        return []
    return [override("data.train_on", "assistant" if value else "all")]


def _assistant_only(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [override("data.train_on", "assistant")] if value else []


def _max_length(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return max_length(value, cfg, ctx) + [override("data.too_long", "truncate")]  # TRL truncates what is longer


mapping = TrlPlugin(
    config_classes=("SFTConfig",),
    handlers={
        "packing": direct("data.packing"),
        "completion_only_loss": _completion_only,
        "assistant_only_loss": _assistant_only,
        "packing_strategy": must_be("bfd", "modalforge packs its own way (best-fit, no cross-attention)"),
        "loss_type": must_be("nll", "modalforge's sft trains with NLL only"),
        "dataset_text_field": must_be("text", "modalforge's sft detects its record formats itself"),
        "max_length": _max_length,
    },
    pretrained_model="sft/pretrained",
)
