"""Output a person can read: third-party notices that say nothing about this run, silenced at their source.

Each filter names the message it drops and why that message is harmless here; it
matches that message's own words (a regex anchored at its start) and category, so
every other warning, from the same library too, still shows. :func:`install` is
idempotent and is called by :func:`modalforge.run.run` before anything is built;
:class:`FrozenHelpersInEval` is one of the run's callbacks.

What stays on purpose: Lightning's "modules in eval mode" warning when a module
other than an objective's frozen helpers is in eval mode (that is a bug worth
seeing), and every warning not listed here.
"""

from __future__ import annotations

import logging
import re
import warnings
import lightning as L

#: (message regex, category, module regex, why it is harmless) for ``warnings.filterwarnings``.
WARNINGS: tuple[tuple[str, type[Warning], str, str], ...] = (
    # torch >= 2.9 deprecated `isinstance(x, LeafSpec)`; Lightning's own _pytree copy still does it on
    # every fit. Only Lightning can change that line; our code never touches LeafSpec.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, "", "Lightning's internal pytree use"),
    # PEFT's get_peft_model reads `model.is_gradient_checkpointing`, which transformers 5 renamed to
    # `is_activation_checkpointing`; PEFT still gets the right answer through the deprecated alias.
    (r"`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, "",
     "PEFT reading transformers' renamed property"),
    # Lightning warns when an epoch has fewer batches than log_every_n_steps. Training here spans
    # epochs (max_epochs=-1, stopped by max_steps) and Lightning counts the logging interval in
    # global steps, so a short epoch (a small demo dataset) loses no logged step.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning, "",
     "small epochs still log every log_every_n_steps global steps"),
)

#: (logger name, message regex, why it is harmless) for ``logging`` records.
LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    # Lightning prints an advertisement for its hosted logger on every Trainer it builds: not about this run.
    # rank_zero_info logs through the logger of whichever Lightning package was imported last.
    *[(name, r"💡 Tip: For seamless cloud logging", "Lightning's litlogger advertisement")
      for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                   "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                   "lightning_utilities.core.rank_zero")],
    # bitsandbytes on CPUs with AVX512-BF16 tries an optional hub kernel (the `kernels` package) for 4-bit
    # matmuls and, without it, uses its own CPU implementation: same results, so the notice says nothing.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes falls back to its built-in CPU kernel"),
)

_EVAL_MODE = "Found {n} module(s) in eval mode at the start of training"


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_installed = False


def add_warning_filters() -> None:
    """The ``warnings`` half of :func:`install` (again inside a ``warnings.catch_warnings`` block, for tests)."""
    for message, category, module, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def install() -> None:
    """Add the filters above; calling it again adds nothing twice (``filterwarnings`` replaces an equal filter)."""
    global _installed
    add_warning_filters()  # every call: a ``catch_warnings`` block (pytest's) may have dropped them since
    if _installed:
        return
    _installed = True
    by_logger: dict[str, list[str]] = {}
    for name, message, _why in LOG_RECORDS:
        by_logger.setdefault(name, []).append(message)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))


class FrozenHelpersInEval(L.Callback):
    """Silence Lightning's "N module(s) in eval mode" when those N are exactly the objective's frozen helpers.

    A reference policy (dpo, grpo, ppo), a VAE or text encoder (diffusion), a frozen vision tower
    (vlm) are meant to stay in eval mode (no dropout, fixed norm statistics). The filter is for that
    exact count: one more module in eval mode, outside the frozen helpers, and the warning shows.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prefixes = tuple(getattr(pl_module, "_frozen_prefixes", lambda: [])())
        in_eval = [name for name, module in pl_module.named_modules() if not module.training]
        if in_eval and prefixes and all(f"{name}.".startswith(prefixes) for name in in_eval):
            warnings.filterwarnings("ignore", message=re.escape(_EVAL_MODE.format(n=len(in_eval))))

