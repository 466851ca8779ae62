"""dpo's ``trl_config=``: a TRL ``DPOConfig`` file, read through the shared mapping in ``modalforge.cli.trl_config``.

The Objective's parameters that share TRL's names (``beta``, ``loss_weights``, ``ld_alpha``...) map
onto ``objective.<name>`` by themselves; only what needs translating is here.
"""

from __future__ import annotations

from typing import Any

from modalforge.cli.trl_config import Context, Ignored, TrlPlugin, Unmapped, max_length, override

#: TRL's losses that read ``label_smoothing``.
_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")


def _loss(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [override("objective.loss", [value] if isinstance(value, str) else list(value))]


def _label_smoothing(value: Any, cfg: dict, ctx: Context) -> list[str]:
    names = cfg.get("loss_type", ["sigmoid"])
    names = [names] if isinstance(names, str) else list(names)
    if value and not set(names).intersection(_SMOOTHED):
        raise Ignored(f"TRL reads label_smoothing only in {', '.join(_SMOOTHED)}, not {names}")
    return [override("objective.label_smoothing", value)]


def _precompute(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return [override("objective.reference", "precomputed")] if value else []


def _max_length(value: Any, cfg: dict, ctx: Context) -> list[str]:
    return max_length(value, cfg, ctx) + [override("data.too_long", "truncate")]  # TRL truncates what is longer


def _truncation(value: Any, cfg: dict, ctx: Context) -> list[str]:
    if value not in ("keep_start", "keep_end"):
        raise Unmapped("data.truncation_mode is keep_start or keep_end")
    return [override("data.truncation_mode", value)]


mapping = TrlPlugin(
    config_classes=("DPOConfig",),
    handlers={"loss_type": _loss, "label_smoothing": _label_smoothing, "precompute_ref_log_probs": _precompute,
              "max_length": _max_length, "truncation_mode": _truncation},
    pretrained_model="dpo/pretrained",
)
