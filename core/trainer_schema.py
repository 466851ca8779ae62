"""The ``trainer`` config schema, derived from ``lightning.Trainer.__init__``.

Never a hand-written list of Trainer keys: every argument Lightning accepts can be
set as ``trainer.<arg>=...``, and a typo (``trainer.max_step=``) is still rejected
by OmegaConf's struct mode with the valid keys one ``--cfg job`` away.
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache
from typing import Any

_PRIMITIVES = (int, float, str, bool, type(None))


def _field_default(value: Any) -> Any:
    # Defaults OmegaConf cannot hold (timedelta, objects) become None; they are never
    # passed on, see `trainer_kwargs`, so Lightning keeps its own default.
    return value if isinstance(value, _PRIMITIVES) else None


@lru_cache(maxsize=1)
def trainer_schema() -> type:
    """A dataclass with one ``Any`` field per ``lightning.Trainer.__init__`` argument."""
    import lightning as L

    fields = []
    for name, param in inspect.signature(L.Trainer.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = None if param.default is inspect.Parameter.empty else _field_default(param.default)
        fields.append((name, Any, dataclasses.field(default=default)))
    return dataclasses.make_dataclass("TrainerConfig", fields)


def trainer_kwargs(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Only the arguments the config changed from Lightning's defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(trainer_schema())}
    return {k: v for k, v in trainer_cfg.items() if k in defaults and v != defaults[k]}
