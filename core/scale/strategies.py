"""Build Lightning's own strategies from the ``strategy`` config node.

The config is plain data (``name`` + settings), so ``strategy=fsdp
strategy.reshard_after_forward=false`` works from the command line; what only
the plugin knows, its transformer block classes, is passed in here so FSDP shards
each block and activation checkpointing applies per block. ``fsdp`` is FSDP2
(:mod:`modalforge.scale.fsdp2`, CPU and GPU); ``fsdp1`` is Lightning's FSDP1 (GPUs only).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

from torch import nn

from modalforge.errors import ModalforgeError

STRATEGY_NAMES = ("auto", "ddp", "fsdp", "fsdp1", "deepspeed_zero2", "deepspeed_zero3")
#: Strategies Lightning runs only on CUDA GPUs.
GPU_ONLY = ("fsdp1", "deepspeed_zero2", "deepspeed_zero3")


#: The settings each strategy reads (besides ``name``); any other key is a typo, refused by name.
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "auto": (),
    "ddp": ("find_unused_parameters", "static_graph", "gradient_as_bucket_view", "timeout"),
    "fsdp": ("reshard_after_forward", "activation_checkpointing", "cpu_offload", "shard_size",
             "distributed_checkpoint", "timeout"),
    "fsdp1": ("activation_checkpointing", "sharding_strategy", "cpu_offload", "state_dict_type", "limit_all_gathers",
              "use_orig_params", "timeout"),
    "deepspeed_zero2": ("offload_optimizer", "offload_parameters", "allgather_bucket_size", "reduce_bucket_size"),
    "deepspeed_zero3": ("offload_optimizer", "offload_parameters", "allgather_bucket_size", "reduce_bucket_size"),
}


def check_strategy_keys(cfg: Mapping[str, Any] | None) -> None:
    """An unknown ``strategy.<key>`` (``+strategy.static_graphh=true``) is one error, never silently ignored."""
    import difflib

    from modalforge.errors import ConfigError

    cfg = dict(cfg or {})
    name = str(cfg.pop("name", "auto"))
    if name not in STRATEGY_KEYS:
        raise ConfigError(f"is not one of: {', '.join(STRATEGY_NAMES)}", where=f"strategy.name={name}")
    valid = STRATEGY_KEYS[name]
    for key in cfg:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
            raise ConfigError(f"strategy={name} has no setting {key!r}" + (f" (did you mean '{close[0]}'?)" if close
                                                                          else ""), where=f"strategy.{key}",
                              hint=f"settings of strategy={name}: {', '.join(valid) or 'none'}")


def _timeout(cfg: dict[str, Any]):  # noqa: ANN202 - datetime.timedelta
    import datetime

    seconds = float(cfg.get("timeout", 1800))
    if seconds <= 0:
        raise ModalforgeError(f"strategy.timeout={cfg.get('timeout')!r}: seconds a collective may wait, above 0")
    return datetime.timedelta(seconds=seconds)


def _ddp(cfg: dict[str, Any]):  # noqa: ANN202
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
                       static_graph=bool(cfg.get("static_graph", False)),
                       gradient_as_bucket_view=bool(cfg.get("gradient_as_bucket_view", True)),
                       timeout=_timeout(cfg))


def _fsdp2(cfg: dict[str, Any], block_classes: set[type[nn.Module]]):  # noqa: ANN202
    from modalforge.scale.fsdp2 import FSDP2Strategy

    shard_size = cfg.get("shard_size")
    return FSDP2Strategy(block_classes, reshard_after_forward=bool(cfg.get("reshard_after_forward", True)),
                         activation_checkpointing=bool(cfg.get("activation_checkpointing", False)),
                         cpu_offload=bool(cfg.get("cpu_offload", False)),
                         shard_size=int(shard_size) if shard_size else None,
                         distributed_checkpoint=bool(cfg.get("distributed_checkpoint", False)),
                         timeout=_timeout(cfg).total_seconds())


def _fsdp(cfg: dict[str, Any], block_classes: set[type[nn.Module]]):  # noqa: ANN202
    from lightning.pytorch.strategies import FSDPStrategy

    if not block_classes:
        warnings.warn(
            "strategy=fsdp1: the plugin names no transformer block classes (Objective.block_classes), so FSDP "
            "wraps only the whole model: no per-block sharding, no activation checkpointing. Implement "
            "block_classes() in the plugin's Objective.", stacklevel=2)
    policy = set(block_classes) or None
    return FSDPStrategy(
        auto_wrap_policy=policy,
        activation_checkpointing_policy=policy if cfg.get("activation_checkpointing") and policy else None,
        sharding_strategy=cfg.get("sharding_strategy", "FULL_SHARD"),
        cpu_offload=bool(cfg.get("cpu_offload", False)),
        state_dict_type=cfg.get("state_dict_type", "sharded"),
        limit_all_gathers=bool(cfg.get("limit_all_gathers", True)),
        use_orig_params=bool(cfg.get("use_orig_params", True)),
        timeout=_timeout(cfg),
    )


def _deepspeed(cfg: dict[str, Any], stage: int):  # noqa: ANN202
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ModalforgeError(f"strategy=deepspeed_zero{stage} needs DeepSpeed: pip install \"modalforge[deepspeed]\" "
                              f"({type(err).__name__}: {err})") from err
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(
        stage=stage,
        offload_optimizer=bool(cfg.get("offload_optimizer", False)),
        offload_parameters=bool(cfg.get("offload_parameters", False)),
        allgather_bucket_size=int(cfg.get("allgather_bucket_size", 200_000_000)),
        reduce_bucket_size=int(cfg.get("reduce_bucket_size", 200_000_000)),
    )


def _has_gpu(accelerator: str) -> bool:
    import torch

    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def build_strategy(cfg: Mapping[str, Any] | None, *, block_classes: set[type[nn.Module]] = frozenset(),
                   accelerator: str = "auto"):  # noqa: ANN201 - str | Strategy
    """``"auto"`` or a Lightning ``Strategy`` for the ``strategy`` config node.

    Args:
        cfg: the ``strategy`` node as a plain dict (``name`` plus settings), or ``None``.
        block_classes: the plugin's transformer block classes (FSDP auto-wrap and activation checkpointing).
        accelerator: the trainer's accelerator, for strategies whose defaults depend on it.
    """
    check_strategy_keys(cfg)
    cfg = dict(cfg or {})
    name = cfg.pop("name", "auto")
    if name == "auto":
        return "auto"
    if name in GPU_ONLY and not _has_gpu(accelerator):
        raise ModalforgeError(f"strategy={name} needs CUDA GPUs (Lightning runs FSDP1 and DeepSpeed only there) and "
                              f"this run has accelerator={accelerator!r} without one; on CPUs use strategy=fsdp "
                              "(FSDP2) or strategy=ddp")
    if name == "ddp":
        return _ddp(cfg)
    if name == "fsdp":
        return _fsdp2(cfg, set(block_classes))
    if name == "fsdp1":
        return _fsdp(cfg, set(block_classes))
    if name in ("deepspeed_zero2", "deepspeed_zero3"):
        return _deepspeed(cfg, int(name[-1]))
    raise ModalforgeError(f"strategy.name={name!r} is not one of: {', '.join(STRATEGY_NAMES)}")
