"""Third-party noise is filtered precisely (core/quiet.py); warnings that matter still show."""

from __future__ import annotations

import logging
import warnings

import pytest
from torch import nn

from cli_helpers import FAST, run_cli
from modalforge import quiet

#: What a user used to read on every run, and must not any more (see the filters' comments for why).
NOISE = ("litlogger", "LeafSpec", "is_gradient_checkpointing", "smaller than the logging interval",
         "in eval mode", "kernels-community")


def _shown(message: str, category: type[Warning]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.add_warning_filters()
        warnings.warn(message, category)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("message, category", [
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.", FutureWarning),
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`",
     FutureWarning),
    ("The number of training batches (5) is smaller than the logging interval Trainer(log_every_n_steps=10).",
     UserWarning),
])
def test_the_listed_warnings_are_dropped(message: str, category: type[Warning]):
    assert _shown(message, category) == []


@pytest.mark.parametrize("message, category", [
    ("`isinstance(treespec, LeafSpec)` is deprecated", UserWarning),  # another category: not ours to hide
    ("`some_other_property` is deprecated and will be removed in v6.", FutureWarning),
    ("Found 3 module(s) in eval mode at the start of training.", UserWarning),  # not frozen helpers: stays
    ("The loss is NaN", UserWarning),
])
def test_other_warnings_still_show(message: str, category: type[Warning]):
    assert _shown(message, category) == [message]


def test_log_notices_are_dropped_and_other_records_kept():
    quiet.install()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    notices = {"lightning.pytorch.utilities.rank_zero": "💡 Tip: For seamless cloud logging and experiment tracking, "
                                                         "try installing [litlogger]",
               "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: %s."}
    for name, notice in notices.items():
        logger = logging.getLogger(name)
        handler, level = Keep(), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            logger.warning(notice, "No module named 'kernels'") if "%s" in notice else logger.info(notice)
            logger.info("GPU available: False, used: False")
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert seen == ["GPU available: False, used: False"] * 2


class _WithHelper(nn.Module):
    def __init__(self, stray_eval: bool) -> None:
        super().__init__()
        self.policy = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        self.reference = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).eval()  # a frozen helper: 3 modules
        if stray_eval:
            self.policy[1].eval()  # a module that should train but does not: the warning must show

    def _frozen_prefixes(self) -> list[str]:
        return ["reference."]


@pytest.mark.parametrize("stray_eval, shown", [(False, False), (True, True)])
def test_eval_mode_warning_is_dropped_only_for_frozen_helpers(stray_eval: bool, shown: bool):
    module = _WithHelper(stray_eval)
    count = sum(not m.training for m in module.modules())
    message = f"Found {count} module(s) in eval mode at the start of training. This may lead to unexpected behavior"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.FrozenHelpersInEval().on_fit_start(None, module)  # type: ignore[arg-type]
        warnings.warn(message, UserWarning)
    assert bool(caught) is shown


@pytest.mark.slow
def test_a_short_lora_run_prints_none_of_the_noise(tmp_path):
    """A real ``train`` with warnings on (PYTHONWARNINGS unset): an epoch shorter than log_every_n_steps, LoRA."""
    proc = run_cli("train", "plugin=causal_lm", *FAST, "adapter=lora", "trainer.max_steps=3",
                   "trainer.limit_train_batches=2", "trainer.log_every_n_steps=5", "trainer.limit_val_batches=0",
                   "checkpoint.export_on_end=false", f"run_dir={tmp_path / 'run'}", env={"PYTHONWARNINGS": "default"})
    shown = [word for word in NOISE if word in proc.stderr]
    assert not shown, proc.stderr[-3000:]
    assert "Trainer.fit` stopped" in proc.stderr  # the run's own lines are still there
