"""Check the whole composed config before any data is read or model built.

Each node's schema comes from the signature of what it configures, never from a
hand-written list: ``trainer`` from ``lightning.Trainer.__init__``; ``data``,
``objective``, ``model``, ``adapter``, ``logger.*`` and ``callbacks.*`` from
their ``_target_``'s signature (types, ``Literal`` choices, unknown keys);
``optim``, ``module`` and ``checkpoint`` from the root ``train.yaml`` that
ships the defaults. Keys added with ``+`` are checked like any other: OmegaConf's
struct mode stops a typo only when it is *set*, not when it is *added*.

The first problem found raises a :class:`~modalforge.errors.ConfigError` whose
``where`` is the dotted key and whose message names the value and the choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from modalforge.errors import ConfigError

log = logging.getLogger(__name__)

#: Root keys every run has; plugins may add nodes only under these. A plugin's own root variable
#: (one its YAML interpolates, as ``${name}``) passes as an experiment variable does.
ROOT_KEYS = ("seed", "run_dir", "ckpt_path", "overwrite", "optim", "module", "checkpoint", "trainer", "adapter",
             "strategy", "logger", "callbacks", "plugin", "data", "model", "objective", "experiment", "hydra",
             "trl_config", "preset")
_NUMBER = (int, float)


# ---- values against type hints ---------------------------------------------------------
def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(a) for a in typing.get_args(hint))
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        parts = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
             tuple: "a list", dict: "a mapping"}
    base = origin or hint
    return names.get(base, getattr(base, "__name__", str(base)))


def _choices(hint: Any) -> list[Any]:
    """Every ``Literal`` value a hint allows (through unions)."""
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        return [c for a in typing.get_args(hint) for c in _choices(a)]
    return []


def conforms(value: Any, hint: Any) -> bool:
    """Whether a plain config value can be what ``hint`` asks for; unknown classes are accepted."""
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) or (isinstance(a, str) and value == a)
                   for a in typing.get_args(hint))
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(conforms(value, a) for a in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    base = origin or hint
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, _NUMBER) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    if base in (list, tuple, set, frozenset) or (inspect.isclass(base) and base.__module__ == "collections.abc"
                                                 and base.__name__ in ("Sequence", "Iterable", "Collection")):
        return isinstance(value, (list, tuple)) or (base.__name__ in ("Iterable", "Collection") and isinstance(value, dict))
    if base in (dict,) or (inspect.isclass(base) and base.__name__ in ("Mapping", "MutableMapping")):
        return isinstance(value, dict)
    if base is Path or (inspect.isclass(base) and issubclass(base, Path)):
        return isinstance(value, (str, Path))
    return True  # a class the config cannot hold as plain data (a Callback, a dtype): not ours to judge


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _plain(node: Any) -> Any:
    """Plain data, resolved key by key: a value that cannot resolve (``???``, an interpolation only
    a running Hydra job knows) stays as its raw text."""
    if isinstance(node, DictConfig):
        out: dict[str, Any] = {}
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)):
                out[str(key)] = _plain(child)
                continue
            try:
                value = node[key]
                # an interpolation to a list or mapping (``${data.mean}``) resolves to a container
                out[str(key)] = OmegaConf.to_container(value, resolve=True) if isinstance(
                    value, (DictConfig, ListConfig)) else value
            except Exception:  # noqa: BLE001 - MissingMandatoryValue, InterpolationResolutionError
                out[str(key)] = str(child._value())
        return out
    if isinstance(node, ListConfig):
        try:
            return OmegaConf.to_container(node, resolve=True)
        except Exception:  # noqa: BLE001
            return OmegaConf.to_container(node, resolve=False)
    return node


def _unresolved(value: Any) -> bool:
    return isinstance(value, str) and (value == "???" or value.startswith("${"))


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data (resolved where it can be), without Hydra's own node."""
    out: dict[str, Any] = {}
    for key in cfg:
        if str(key) == "hydra":
            continue
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)):
            out[str(key)] = _plain(node)
        else:
            try:
                out[str(key)] = cfg[key]
            except Exception:  # noqa: BLE001
                out[str(key)] = str(node)
    return out


def check_value(where: str, value: Any, hint: Any, *, default: Any = inspect.Parameter.empty) -> None:
    """Raise ``ConfigError`` at ``where`` if ``value`` cannot be of type ``hint``."""
    if value is None and default is None:
        return
    if value == "???":
        raise ConfigError("is required and not set", where=where)
    if _unresolved(value):
        return
    if conforms(value, hint):
        return
    choices = _choices(hint)
    others = typing.get_args(hint) if typing.get_origin(hint) is not typing.Literal else ()  # a union's non-choices
    if choices and not any(conforms(value, a) for a in others if typing.get_origin(a) is not typing.Literal):
        shown = ", ".join(dict.fromkeys(str(c) for c in choices))
        raise ConfigError(f"{value!r} is not one of: {shown}{_suggest(str(value), [str(c) for c in choices])}",
                          where=where)
    raise ConfigError(f"{value!r} is {type(value).__name__}, expected {_describe(hint)}", where=where)


# ---- signatures --------------------------------------------------------------------------
def _hints(obj: Callable[..., Any]) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - unresolvable forward references: check keys, not types
        return {}


def _option_group(hint: Any) -> type | None:
    """The dataclass a parameter's hint names (through ``Optional`` and unions), if any: a grouped option."""
    if dataclasses.is_dataclass(hint) and inspect.isclass(hint):
        return hint
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        return next((g for a in typing.get_args(hint) if (g := _option_group(a)) is not None), None)
    return None


def check_call(where: str, target: str | Callable[..., Any], kwargs: Mapping[str, Any], *,
               skip: typing.Iterable[str] = ()) -> None:
    """Bind ``kwargs`` to ``target``'s signature: unknown keys, types and choices, without calling it.

    ``target`` is a dotted path or the callable itself. A parameter typed as a dataclass (a group of
    options, ``objective.ema.decay``) given as a mapping is checked against that dataclass in turn.
    """
    from hydra.utils import get_object

    try:
        obj = get_object(target) if isinstance(target, str) else target
    except Exception as err:  # noqa: BLE001 - ImportError, AttributeError...
        from modalforge.errors import missing_dependency

        hint = missing_dependency(err)
        raise ConfigError(f"cannot import {target!r}: {hint or f'{type(err).__name__}: {err}'}",
                          where=f"{where}._target_") from None
    if not isinstance(target, str):
        target = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}"
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    hints = _hints(obj)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes_any and inspect.isclass(obj):
        # `def __init__(self, **kwargs): super().__init__(**kwargs)`: the parent's signature is the schema
        for base in obj.__mro__[1:]:
            if "__init__" not in vars(base) or base is object:
                continue
            base_params = inspect.signature(base.__init__).parameters
            params = {**{k: p for k, p in params.items() if p.kind is not p.VAR_KEYWORD}, **base_params}
            hints = {**_hints(base), **hints}
            takes_any = any(p.kind is p.VAR_KEYWORD for p in base_params.values())
            if not takes_any:
                break
    for key, value in kwargs.items():
        if key.startswith("_") or key in skip:
            continue
        param = params.get(key)
        if param is None or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            if takes_any:
                continue
            valid = [k for k, p in params.items() if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
            raise ConfigError(f"unknown key for {target}{_suggest(key, valid)}", where=f"{where}.{key}",
                              hint=f"valid keys of {where}: {', '.join(valid)}")
        if key in hints:
            group = _option_group(hints[key])
            if group is not None and isinstance(value, Mapping):
                check_call(f"{where}.{key}", group, value)
                continue
            check_value(f"{where}.{key}", value, hints[key], default=param.default)


# ---- the nodes ----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _root_defaults() -> dict[str, Any]:
    from modalforge.config import conf_root

    return OmegaConf.to_container(OmegaConf.load(conf_root() / "train.yaml"), resolve=False)  # type: ignore[return-value]


def _check_against_defaults(name: str, node: Mapping[str, Any], choices: Mapping[str, typing.Sequence[Any]]) -> None:
    defaults = _root_defaults().get(name) or {}
    for key, value in node.items():
        where = f"{name}.{key}"
        if key not in defaults:
            raise ConfigError(f"unknown key{_suggest(key, defaults)}", where=where,
                              hint=f"valid keys of {name}: {', '.join(defaults)}")
        if key in choices:
            if value not in choices[key]:
                raise ConfigError(f"{value!r} is not one of: {', '.join(map(str, choices[key]))}"
                                  f"{_suggest(str(value), map(str, choices[key]))}", where=where)
            continue  # a listed choice is valid whatever the default's type (module.compile: false or 'model')
        default = defaults[key]
        if value is None or default is None or isinstance(default, str) and "${" in default:
            continue
        expected: Any = type(default)
        if expected is float:
            expected = float
        elif expected is list:
            expected = list
        if not conforms(value, expected):
            raise ConfigError(f"{value!r} is {type(value).__name__}, expected {_describe(expected)}", where=where)


def _check_trainer(node: Mapping[str, Any]) -> None:
    check_call("trainer", "lightning.Trainer", node)
    from modalforge.scale.batchnorm import check_sync_batchnorm

    check_sync_batchnorm(node, str(node.get("accelerator") or "auto"))


def _optim_choices() -> dict[str, typing.Sequence[Any]]:
    from modalforge import optim

    return {"name": optim.OPTIMIZER_NAMES, "scheduler": optim.SCHEDULERS}


def _check_optim(node: Mapping[str, Any]) -> None:
    """The named optimizers against the defaults; with ``optim._target_`` the keys the defaults lack go to
    the class's signature (``+optim.alpha=0.9`` for RMSprop), checked like any ``_target_`` node."""
    target = node.get("_target_")
    if not target:
        _check_against_defaults("optim", node, _optim_choices())
        return
    from modalforge import optim

    defaults = _root_defaults().get("optim") or {}
    _check_against_defaults("optim", {k: v for k, v in node.items() if k in defaults}, _optim_choices())
    check_call("optim", str(target), {k: v for k, v in node.items() if k not in optim.CORE_KEYS and k not in defaults})


def _check_targets(name: str, node: Any) -> None:
    """``logger`` / ``callbacks``: a mapping of named ``_target_`` nodes (or null to turn one off)."""
    if not isinstance(node, Mapping):
        return
    for key, child in node.items():
        if isinstance(child, Mapping) and child.get("_target_"):
            check_call(f"{name}.{key}", str(child["_target_"]), child)


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first wrong key, type or choice anywhere in ``cfg``."""
    raw = OmegaConf.to_yaml(cfg, resolve=False) if any(str(k) not in ROOT_KEYS for k in cfg) else ""
    for key in cfg:
        # A root key of its own is a variable of an experiment (``sft_dir``) only if something uses it.
        if str(key) not in ROOT_KEYS and "${" + str(key) not in raw:
            raise ConfigError(f"unknown top-level key '{key}'{_suggest(str(key), ROOT_KEYS)}", where=str(key),
                              hint="a top-level variable must be used somewhere as ${" + str(key) + "}")
    plain = resolved(cfg)
    for key, value in plain.items():
        if value == "???":
            raise ConfigError("is required and not set", where=key,
                              hint=f"set it on the command line: {key}=... (the plugin's README gives its form)")
    if isinstance(plain.get("strategy"), Mapping):
        from modalforge.scale.strategies import check_strategy_keys

        check_strategy_keys(plain["strategy"])
    if plain.get("trainer") is not None:
        _check_trainer(plain["trainer"])
    if plain.get("optim") is not None:
        _check_optim(plain["optim"])
    for name in ("module", "checkpoint"):
        if plain.get(name) is not None:
            from modalforge.callbacks.data_identity import ON_CHANGE
            from modalforge.callbacks.nonfinite import NONFINITE_MODES
            from modalforge.compile import COMPILE_CHOICES
            from modalforge.losses.lm import LOSS_IMPLS

            _check_against_defaults(name, plain[name], {"nonfinite": NONFINITE_MODES, "loss_impl": LOSS_IMPLS,
                                                        "compile": COMPILE_CHOICES}
                                    if name == "module" else {"on_data_change": ON_CHANGE})
    for name in ("data", "adapter"):
        node = plain.get(name)
        if isinstance(node, Mapping) and node.get("_target_"):
            if name == "data":  # data.batch_size=auto and the search's keys are the core's, not the DataModule's
                from modalforge.batch_size import check_options, datamodule_config

                check_options(node)
                node = datamodule_config(node)
            check_call(name, str(node["_target_"]), node)
    objective = plain.get("objective")
    if isinstance(objective, Mapping) and objective.get("_target_"):
        check_call("objective", str(objective["_target_"]), objective, skip=("model",))
    model = plain.get("model")
    if isinstance(model, Mapping) and model.get("_target_"):
        check_call("model", str(model["_target_"]), model)
        if model.get("name_or_path") and model.get("config"):
            log.warning("model.name_or_path=%s is set, so model.config (settings for a model built from scratch) is "
                        "not used; select the plugin's pretrained model config (model=<plugin>/pretrained) or drop "
                        "model.config", model["name_or_path"])
    strategy = plain.get("strategy")
    if isinstance(strategy, Mapping):
        from modalforge.scale.strategies import STRATEGY_NAMES

        name = strategy.get("name", "auto")
        if name not in STRATEGY_NAMES:
            raise ConfigError(f"{name!r} is not one of: {', '.join(STRATEGY_NAMES)}", where="strategy.name")
    for name in ("logger", "callbacks"):
        _check_targets(name, plain.get(name))
    ckpt = plain.get("ckpt_path")
    if ckpt is not None and not isinstance(ckpt, str):
        raise ConfigError(f"{ckpt!r} is not a path: use ckpt_path=last, a .ckpt file or a run directory",
                          where="ckpt_path")
    if not isinstance(plain.get("seed", 0), int) or isinstance(plain.get("seed"), bool):
        raise ConfigError(f"{plain.get('seed')!r} is not an integer", where="seed")
