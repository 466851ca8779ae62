"""Scale switches: Lightning strategies built from the ``strategy`` config group, and precision defaults."""

from modalforge.scale.precision import check_precision, default_precision
from modalforge.scale.strategies import STRATEGY_NAMES, build_strategy

__all__ = ["STRATEGY_NAMES", "build_strategy", "check_precision", "default_precision"]
