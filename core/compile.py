"""``module.compile``: ``torch.compile`` each repeated block in place (regional compilation), or the whole model.

Compiling the repeated transformer block once, as torchtitan does, keeps compile time to one
block's graph whatever the depth, and in place (``nn.Module.compile``) the parameter names, the
state dict, checkpoints, exports and FSDP2's ``fully_shard`` of each block stay as in eager mode;
wrapping the model in ``torch.compile(model)`` would prefix every key with ``_orig_mod.``.
A model without declared blocks (``Objective.block_classes()`` empty) is compiled whole, in place.
Random ops inside a compiled region (dropout, DiT's label dropout) draw from inductor's generator,
not eager torch's: such a model trains as well, but not bit for bit as in eager mode.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from torch import nn

from modalforge.errors import ConfigError

log = logging.getLogger(__name__)

CompileMode = Literal["blocks", "model"]
#: the values ``module.compile`` takes (true is ``blocks``)
COMPILE_CHOICES = (False, True, "blocks", "model")


def compile_mode(value: Any) -> CompileMode | None:
    """``module.compile`` as a mode: false -> None (eager), true -> blocks, or ``blocks`` / ``model``."""
    if value is None or value is False:
        return None
    if value is True or value == "blocks":
        return "blocks"
    if value == "model":
        return "model"
    raise ConfigError(f"module.compile={value!r} is not one of: false, true (= blocks), blocks, model",
                      where="module.compile")


def compile_in_place(target: nn.Module, block_classes: set[type[nn.Module]], mode: CompileMode,
                     **options: Any) -> int:
    """Compile ``target``'s blocks (or ``target`` itself) in place; returns how many modules were compiled.

    Args:
        target: the adapter target (the trained model, PEFT-wrapped or not).
        block_classes: the Objective's repeated block classes.
        mode: ``blocks`` (each instance of a block class; the whole model when there is none) or ``model``.
        options: passed to ``torch.compile`` (``mode``, ``dynamic``, ``fullgraph``, ``backend``).
    """
    blocks = [m for m in target.modules() if block_classes and isinstance(m, tuple(block_classes))] \
        if mode == "blocks" else []
    if mode == "blocks" and not blocks:
        log.info("module.compile=blocks: the objective declares no repeated block here, so the whole model is "
                 "compiled")
    for module in blocks or [target]:
        module.compile(**options)
    return len(blocks) or 1
