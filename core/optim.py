"""Optimizer over trainable parameters only, and warmup + decay learning-rate schedules.

Weight decay is never applied to biases, normalisation weights or other 1-D
parameters (the GPT-2/LLaMA convention); frozen parameters never reach the
optimizer, so frozen helpers cost no optimizer memory.

AdamW and SGD run torch's fused kernel by default wherever torch has one for the
parameters' device and dtype (CPU, CUDA, XPU, MPS; floating point): one kernel over
all parameters instead of a Python loop of small ops, 3-4x faster per step on a
6M-parameter model on CPU, same update to float rounding. ``optim.implementation``
picks another (``foreach``, ``for_loop``) for comparison or debugging.
"""

from __future__ import annotations

import inspect

import math
from typing import Any, Iterable, Literal, Mapping, get_args

import torch
from torch import nn

from modalforge.errors import ModalforgeError

_NO_DECAY_NAME_PARTS = ("bias", "norm", "ln_", "layernorm", "embeddings.position")


def parameter_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decay / no-decay groups."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if param.ndim < 2 or any(part in lowered for part in _NO_DECAY_NAME_PARTS):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("no trainable parameters: the adapter froze everything (check adapter.trainable / target_modules)")
    return groups


Implementation = Literal["auto", "fused", "foreach", "for_loop"]


def implementation_flags(params: list[torch.Tensor], implementation: Implementation = "auto", *,
                         unscale_before_step: bool = False) -> dict[str, bool]:
    """``fused`` / ``foreach`` arguments of a torch optimizer for ``optim.implementation``.

    ``auto``: fused where torch has a fused kernel for every parameter's device and dtype, else
    torch's own default (foreach on accelerators, the per-parameter loop elsewhere). ``fused``
    on parameters torch cannot fuse is an error naming the key, not a failure at the first step.

    Args:
        params: the parameters the optimizer will update.
        implementation: ``auto`` | ``fused`` | ``foreach`` | ``for_loop``.
        unscale_before_step: gradients are clipped under mixed precision (``16-mixed``, ``bf16-mixed``):
            Lightning clips (unscaling first) before the step, which it refuses for a fused optimizer.
    """
    from torch.optim.optimizer import _default_to_fused_or_foreach  # torch's own device/dtype rule

    if implementation not in get_args(Implementation):
        raise ModalforgeError(f"optim.implementation={implementation!r} is not one of: "
                              f"{', '.join(get_args(Implementation))}")
    fusable, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=True)
    if implementation == "fused" and unscale_before_step:
        raise ModalforgeError("optim.implementation=fused cannot be combined with gradient clipping under "
                              "trainer.precision=16-mixed or bf16-mixed (Lightning refuses to clip for a fused step, "
                              "which unscales gradients itself); set "
                              "optim.implementation=auto, or trainer.gradient_clip_val=null")
    if implementation == "fused" and not fusable:
        kinds = sorted({f"{p.dtype} on {p.device.type}" for p in params})
        raise ModalforgeError(f"optim.implementation=fused: torch has no fused kernel for parameters of "
                              f"{', '.join(kinds)}; use optim.implementation=auto")
    if implementation == "auto":
        if fusable and not unscale_before_step:
            return {"fused": True}
        if fusable:  # torch's default choice, made without considering fused
            foreach = _default_to_fused_or_foreach(params, differentiable=False)[1]
        return {"foreach": foreach}
    return {"fused": implementation == "fused", "foreach": implementation == "foreach"}


def clips_scaled_gradients(trainer: Any) -> bool:
    """Whether ``trainer`` clips gradients under mixed precision, see ``implementation_flags``.

    Lightning's ``MixedPrecision`` plugin (``16-mixed`` and ``bf16-mixed`` alike) refuses to clip
    for an optimizer that says it unscales gradients itself, which torch's fused ones do."""
    return bool(getattr(trainer, "gradient_clip_val", None)) and str(getattr(trainer, "precision", "")) in (
        "16-mixed", "16", "bf16-mixed", "bf16")


#: ``optim.name`` values served by bitsandbytes, and its class for each. The paged ones keep the
#: optimizer state in CUDA unified memory, paged out to CPU RAM when the GPU runs short (QLoRA's
#: third trick); on a CPU there is nothing to page, and bitsandbytes runs them unpaged (it warns).
_BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit",
                   "paged_adamw_32bit": "PagedAdamW32bit"}
#: Every ``optim.name`` that :func:`build_optimizer` builds.
OPTIMIZER_NAMES = ("adamw", "sgd", *_BNB_OPTIMIZERS)
#: ``optim.scheduler`` values (:func:`lr_lambda`).
SCHEDULERS = ("cosine", "linear", "constant")
#: Keys of the ``optim`` node the core reads itself (schedule, groups); never an optimizer's argument.
#: ``weight_decay`` reaches the optimizer through each parameter group (0 for biases and norms).
CORE_KEYS = ("_target_", "name", "implementation", "lr", "weight_decay", "scheduler", "warmup_steps", "warmup_ratio",
             "min_lr_ratio", "param_groups")
#: The defaults' own optimizer arguments, given to an ``optim._target_`` only where its signature takes them
#: (``torch.optim.RMSprop`` takes ``eps`` and ``momentum``, not ``betas``).
SHARED_ARGUMENTS = ("betas", "eps", "momentum")


def target_arguments(cfg: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The class of ``optim._target_`` and the node's keys it receives besides params and lr.

    Keys the user added (``+optim.alpha=0.9``) always go; the defaults' ``betas``/``eps``/``momentum``
    only where the class names them, so any ``torch.optim`` class or a third party's works unchanged.
    """
    from hydra.utils import get_class

    cls = get_class(str(cfg["_target_"]))
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {}
    for key, value in cfg.items():
        if key in CORE_KEYS or key in SHARED_ARGUMENTS and key not in params and not takes_any:
            continue
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls, kwargs


def _split_by_sharding(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each group split into its sharded (DTensor) and replicated parameters, where it holds both.

    Under ``strategy=fsdp`` a trainable parameter outside every FSDP unit (a value head, CLIP's
    ``logit_scale``) stays a plain tensor; torch's fused and foreach kernels refuse one list that
    mixes the two kinds. Same settings, two groups: the update is unchanged.
    """
    from torch.distributed.tensor import DTensor

    out = []
    for group in groups:
        params = list(group["params"])
        sharded = [p for p in params if isinstance(p, DTensor)]
        if not sharded or len(sharded) == len(params):
            out.append(group)
            continue
        out.append({**group, "params": sharded})
        out.append({**group, "params": [p for p in params if not isinstance(p, DTensor)]})
    return out


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: Mapping[str, Any], *,
                    unscale_before_step: bool = False) -> torch.optim.Optimizer:
    """AdamW (default), SGD, bitsandbytes' 8-bit / paged AdamW, or any class as ``optim._target_``.

    ``optim.implementation`` (``auto`` by default) selects torch's fused, foreach or
    per-parameter implementation of AdamW and SGD; see :func:`implementation_flags`. With
    ``optim._target_`` the class gets the parameter groups, ``lr`` and :func:`target_arguments`;
    the schedule and per-module groups apply as they do to the named ones.
    """
    from modalforge.param_groups import build_param_groups  # per-module lrs (optim.param_groups)

    groups = _split_by_sharding(build_param_groups(named_params, cfg.get("param_groups") or [],
                                                   float(cfg.get("weight_decay", 0.0))))
    name = cfg.get("name", "adamw")
    lr = float(cfg["lr"])
    implementation = cfg.get("implementation") or "auto"
    if cfg.get("_target_"):
        if implementation != "auto":
            raise ModalforgeError(f"optim.implementation={implementation!r} applies to adamw and sgd; pass the "
                                  f"class's own switch instead (+optim.foreach=true)")
        cls, kwargs = target_arguments(cfg)
        try:
            return cls(groups, lr=lr, **kwargs)
        except (TypeError, ValueError) as err:
            raise ModalforgeError(f"optim._target_={cfg['_target_']}: {err}") from None
    if name in ("adamw", "sgd"):
        flags = implementation_flags([p for g in groups for p in g["params"]], implementation,
                                     unscale_before_step=unscale_before_step)
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                     eps=float(cfg.get("eps", 1e-8)), **flags)
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)), **flags)
    if name in _BNB_OPTIMIZERS:
        if implementation != "auto":
            raise ModalforgeError(f"optim.implementation={implementation!r} applies to adamw and sgd; "
                                  f"{name} has bitsandbytes' own kernel")
        import bitsandbytes as bnb

        return getattr(bnb.optim, _BNB_OPTIMIZERS[name])(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                                         eps=float(cfg.get("eps", 1e-8)))
    raise ValueError(f"optim.name={name!r} is not one of: {', '.join(OPTIMIZER_NAMES)}")


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warmup, then decay)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    raise ValueError(f"optim.scheduler={schedule!r} is not one of: cosine, linear, constant")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR``; warmup from ``warmup_steps`` or ``warmup_ratio * total_steps``."""
    warmup = int(cfg.get("warmup_steps", 0) or round(float(cfg.get("warmup_ratio", 0.0)) * total_steps))
    schedule = cfg.get("scheduler", "cosine")
    lr_lambda(0, warmup_steps=warmup, total_steps=total_steps, schedule=schedule, min_lr_ratio=0.0)  # validate name now

    def factor(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup, total_steps=total_steps, schedule=schedule,
                         min_lr_ratio=float(cfg.get("min_lr_ratio", 0.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
