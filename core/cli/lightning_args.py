"""LightningCLI-style arguments for ``train``, rewritten as Hydra overrides before Hydra parses them.

Users coming from ``LightningCLI`` type ``--trainer.max_steps=100``; Hydra users type
``trainer.max_steps=100``. ``train`` accepts both: :func:`translate_argv` rewrites the
first habit into the second and leaves Hydra's own arguments alone, so everything
after it (validation, run directories, sweeps) sees one spelling.

What is mapped (LightningCLI -> Hydra):

- ``--trainer.max_steps=100`` and ``--trainer.max_steps 100`` -> ``trainer.max_steps=100``;
  any other ``--a.b=v`` -> ``a.b=v`` (``--optim.lr=1e-3``, ``--run_dir=x``, ``--plugin=sft``).
- ``--trainer.callbacks+=EarlyStopping`` (a name from ``lightning.pytorch.callbacks`` or an
  import path, or ``{class_path: ..., init_args: {...}}``) -> ``+callbacks.early_stopping._target_=...``;
  the ``--trainer.callbacks.patience=3`` (or ``.init_args.patience``) that follow set that callback's
  arguments. modalforge's callbacks are a mapping (``callbacks.<name>``) added to the defaults,
  so a whole-list replacement (``--trainer.callbacks=[...]``) is refused with the Hydra spelling.
- ``--data.x`` / ``--data.init_args.x`` -> ``++data.x``: the DataModule's arguments, as in LightningCLI
  (``++`` so that an argument the plugin's YAML leaves out can be set; unknown keys are still refused).
- ``--model.x``: LightningCLI's ``model`` is the LightningModule's arguments, which modalforge splits
  into ``model`` (what builds the network) and ``objective`` (the loss and metrics). ``x`` goes to the
  one of the two whose config keys or constructor arguments name it; a name both have, or neither,
  is refused with both Hydra spellings.
- ``--optimizer=AdamW`` / ``--optimizer.lr=..`` -> ``optim.name=adamw`` / ``optim.lr=..``;
  ``--lr_scheduler`` is refused with ``optim.scheduler=..``. ``--seed_everything=N`` -> ``seed=N``.
- ``--config file.yaml`` (several allowed, in order): a YAML in LightningCLI's nested layout
  (``trainer: {max_steps: 100}``, ``model: {...}``, ``data: {...}``, ``optimizer``, ``seed_everything``,
  or any modalforge key such as ``plugin: causal_lm``), flattened into the overrides above at the
  place of ``--config``; an argument after it wins, as in LightningCLI.
- ``--print_config`` -> Hydra's ``--cfg job``; a leading ``fit`` subcommand is dropped.

A form that could mean two things raises :class:`~modalforge.errors.ConfigError` whose
``where`` is the argument and whose ``hint`` is the Hydra spelling.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modalforge.errors import ConfigError
from modalforge.overrides import hydra_value

# Hydra's own flags; those in _HYDRA_VALUED take the next argument as their value.
_HYDRA_VALUED = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                 "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
_HYDRA_FLAGS = _HYDRA_VALUED | {"--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r",
                                "--multirun", "-m", "--info", "-i"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_KEY = re.compile(r"^[A-Za-z_][\w@/-]*(\.\w[\w@/-]*)*$")
_OVERRIDE = re.compile(r"^[+~]*[A-Za-z_][\w.@/-]*=")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_OPTIMIZERS = {"adamw": "adamw", "sgd": "sgd", "adamw8bit": "adamw_8bit", "pagedadamw8bit": "paged_adamw_8bit",
               "pagedadamw": "paged_adamw_32bit", "pagedadamw32bit": "paged_adamw_32bit"}
_OPTIM_KEYS = ("lr", "weight_decay", "betas", "eps", "momentum")
_SUBCOMMANDS = {"validate", "test", "predict"}


def translate_argv(argv: list[str]) -> list[str]:
    """``train``'s arguments with every LightningCLI-style form replaced by its Hydra override.

    Hydra overrides and Hydra's flags pass through unchanged, in their place.

    Args:
        argv: the arguments after ``train``.

    Returns:
        The arguments Hydra understands.

    Raises:
        ConfigError: a form that cannot be mapped or could mean two things (``where`` is the
            argument, ``hint`` the Hydra spelling), or a ``--config`` file that cannot be read.
    """
    state = _State()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in _HYDRA_FLAGS or arg.split("=", 1)[0] in _HYDRA_VALUED:
            state.out.append(arg)
            takes_value = arg in _HYDRA_VALUED or (arg in ("--info", "-i") and i < len(argv)
                                                   and argv[i] in _INFO_CHOICES)
            if takes_value and i < len(argv):
                if arg == "-c" and argv[i].endswith((".yaml", ".yml")):
                    raise ConfigError("-c is Hydra's --cfg (print the config), not LightningCLI's --config",
                                      where=f"-c {argv[i]}", hint=f"--config {argv[i]}")
                state.out.append(argv[i])
                i += 1
            continue
        if not arg.startswith("--"):
            if arg == "fit" and not state.out:
                continue  # LightningCLI's subcommand; `train` is fit
            if arg in _SUBCOMMANDS and not state.out:
                raise ConfigError(f"`train` only trains (LightningCLI's fit); there is no {arg} subcommand", where=arg,
                                  hint="drop it: train plugin=<name> ...")
            state.out.append(arg)
            continue
        name, has_value, value = arg[2:].partition("=")
        if name == "print_config":
            state.out += ["--cfg", "job"]
            continue
        if not has_value:
            if i < len(argv) and _is_value(argv[i]):
                value, has_value = argv[i], True
                arg = f"{arg} {value}"
                i += 1
            elif name == "config":
                raise ConfigError("--config needs a YAML file", where=arg, hint="--config file.yaml")
            else:
                raise ConfigError("needs a value", where=arg, hint=f"{name.rstrip('+')}=<value> (Hydra spelling)")
        if name == "config":
            _read_config_file(state, value)
            continue
        append = name.endswith("+")
        name = name[:-1] if append else name
        if not _KEY.match(name):
            raise ConfigError("not a config key", where=arg, hint="key=value (Hydra spelling), e.g. trainer.max_steps=100")
        _translate(state, name, value, append, where=arg)
    return state.resolve()


@dataclass
class _Pending:
    """A ``model.*`` argument, placed once the plugin's ``model`` and ``objective`` keys are known."""

    index: int
    path: str
    value: str
    where: str


class _State:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.pending: list[_Pending] = []
        self.callbacks: list[str] = []  # names added by --trainer.callbacks+=, in order

    def resolve(self) -> list[str]:
        if self.pending:
            in_model, in_objective = _model_objective_keys(self.out)
            for item in reversed(self.pending):
                self.out.insert(item.index, _place_model_key(item, in_model, in_objective))
        return self.out


def _is_value(arg: str) -> bool:
    """Whether the argument after ``--key`` is its value (not a flag, not a Hydra override)."""
    if _NUMBER.match(arg):
        return True
    return not arg.startswith("-") and not _OVERRIDE.match(arg)


def _translate(state: _State, name: str, value: str, append: bool, where: str) -> None:
    """One ``--name[+]=value`` (value already in Hydra syntax) -> overrides appended to ``state``."""
    section, _, rest = name.partition(".")
    rest = _strip_init_args(rest)
    if section == "trainer" and (rest == "callbacks" or rest.startswith("callbacks.")):
        _callback_argument(state, rest, value, append, where)
        return
    if append:
        raise ConfigError("`+=` appends only to trainer.callbacks; Hydra has no list-append override", where=where,
                          hint=f"set the whole list: {name}=[a,b,c]")
    if section == "trainer" and rest.split(".")[0] == "logger":
        if rest == "logger" and value.lower() in ("false", "true", "null", "none"):
            state.out.append(f"trainer.logger={value.lower()}")
            return
        raise ConfigError("loggers are chosen by the `logger` config group, not trainer.logger", where=where,
                          hint="logger=csv|tensorboard|wandb|mlflow|many|none (and logger.<name>.<arg>=...)")
    if section in ("model", "data") and (not rest or rest == "class_path"):
        raise ConfigError(f"the {section} class is chosen by the plugin", where=where,
                          hint=f"plugin=<name> (see `modalforge plugins`), then {section}.<arg>=value")
    if section == "model":
        state.pending.append(_Pending(len(state.out), rest, value, where))
    elif section == "data":
        state.out.append(f"++data.{rest}={value}")
    elif section == "optimizer":
        state.out.append(_optimizer(rest, value, where))
    elif section == "lr_scheduler":
        raise ConfigError("the schedule is set by optim.scheduler and its warmup keys", where=where,
                          hint="optim.scheduler=cosine|linear|constant optim.warmup_steps=100 optim.min_lr_ratio=0.1")
    elif section == "seed_everything" and not rest:
        state.out.append(f"seed={value}")
    else:
        state.out.append(f"{section}.{rest}={value}" if rest else f"{section}={value}")


def _strip_init_args(path: str) -> str:
    # LightningCLI's {class_path, init_args} nesting: init_args.x is the argument x itself
    return ".".join(p for p in path.split(".") if p != "init_args")


def _callback_argument(state: _State, rest: str, value: str, append: bool, where: str) -> None:
    if rest == "callbacks" and not append:
        raise ConfigError("modalforge's callbacks are a mapping added to its defaults, not a list to replace",
                          where=where, hint="+callbacks.<name>._target_=<import.path.Class> adds one; "
                                            "callbacks=none drops the defaults")
    if rest == "callbacks":
        _add_callback(state, _parse_yaml(value, where), where)
        return
    if not state.callbacks:
        raise ConfigError("sets an argument of a callback, but no --trainer.callbacks+=<Class> came before it",
                          where=where, hint=f"+callbacks.<name>.{rest.split('.', 1)[1]}={value}")
    state.out.append(f"+callbacks.{state.callbacks[-1]}.{rest.split('.', 1)[1]}={value}")


def _add_callback(state: _State, spec: Any, where: str) -> None:
    """``EarlyStopping``, ``pkg.mod.Class`` or ``{class_path: ..., init_args: {...}}`` -> ``+callbacks.<name>``."""
    init_args: dict[str, Any] = {}
    if isinstance(spec, dict) and "class_path" in spec:
        target, init_args = str(spec["class_path"]), dict(spec.get("init_args") or {})
    elif isinstance(spec, str) and _KEY.match(spec):
        target = spec
    else:
        raise ConfigError("expected a callback class or {class_path: ..., init_args: {...}}", where=where,
                          hint="+callbacks.<name>._target_=<import.path.Class> +callbacks.<name>.<arg>=value")
    if "." not in target:
        target = _lightning_callback(target, where)
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", target.rsplit(".", 1)[-1]).lower()
    name, n = snake, 2
    while name in state.callbacks:
        name, n = f"{snake}_{n}", n + 1
    state.callbacks.append(name)
    state.out.append(f"+callbacks.{name}._target_={target}")
    state.out += [f"+callbacks.{name}.{k}={hydra_value(v)}" for k, v in init_args.items()]


def _lightning_callback(name: str, where: str) -> str:
    """A bare class name, as LightningCLI resolves it: from ``lightning.pytorch.callbacks``."""
    import lightning.pytorch.callbacks as callbacks

    if isinstance(getattr(callbacks, name, None), type):
        return f"lightning.pytorch.callbacks.{name}"
    raise ConfigError(f"no callback {name!r} in lightning.pytorch.callbacks", where=where,
                      hint=f"give its import path: +callbacks.<name>._target_=my.module.{name}")


def _optimizer(rest: str, value: str, where: str) -> str:
    if rest in ("", "class_path"):
        key = value.rsplit(".", 1)[-1].lower().replace("_", "")
        if key in _OPTIMIZERS:
            return f"optim.name={_OPTIMIZERS[key]}"
        raise ConfigError(f"modalforge builds adamw, sgd, adamw_8bit, paged_adamw_8bit or paged_adamw_32bit, "
                          f"not {value}", where=where,
                          hint="optim.name=adamw|sgd|adamw_8bit|paged_adamw_8bit|paged_adamw_32bit")
    if rest in _OPTIM_KEYS:
        return f"optim.{rest}={value}"
    raise ConfigError(f"no optimizer setting {rest!r}", where=where,
                      hint="optim." + "|".join(_OPTIM_KEYS) + "=value (see `train plugin=<name> --cfg job`)")


def _place_model_key(item: _Pending, in_model: set[str], in_objective: set[str]) -> str:
    first = item.path.split(".")[0]
    both = f"model.{item.path}={item.value} (the network builder) or objective.{item.path}={item.value} (the loss)"
    if first in in_model and first in in_objective:
        raise ConfigError(f"LightningCLI's model section is split in two here, and both have {first!r}",
                          where=item.where, hint=both)
    if first in in_model:
        return f"++model.{item.path}={item.value}"
    if first in in_objective:
        return f"++objective.{item.path}={item.value}"
    if first in ("lr", "learning_rate"):
        raise ConfigError("the learning rate is not a model argument here", where=item.where,
                          hint=f"optim.lr={item.value}")
    raise ConfigError(f"neither model nor objective has {first!r}", where=item.where,
                      hint=f"keys of model: {', '.join(sorted(in_model)) or '-'}; "
                           f"of objective: {', '.join(sorted(in_objective)) or '-'}")


def _model_objective_keys(overrides: list[str]) -> tuple[set[str], set[str]]:
    """Config keys and constructor arguments of the selected plugin's ``model`` and ``objective``."""
    from hydra.utils import get_object
    from omegaconf import DictConfig

    from modalforge.config import compose

    groups = [o for o in overrides if "=" in o and not o.startswith(("-", "+", "~"))
              and "." not in o.split("=", 1)[0]]
    if not any(o.startswith("plugin=") for o in groups):
        raise ConfigError("--model.* is read against the plugin's model and objective: name the plugin first",
                          where="--model", hint="plugin=<name> --model.<arg>=value")
    groups = [o.split(",", 1)[0] for o in groups]  # a sweep: the first choice decides
    try:
        cfg = compose(groups)
    except Exception as err:  # noqa: BLE001 - reported as the reason --model.* could not be placed
        raise ConfigError(f"could not compose {' '.join(groups)} to place --model.* arguments: {err}",
                          where="--model", hint="model.<arg>=value or objective.<arg>=value") from None
    found = []
    for node_name, skip in (("model", set()), ("objective", {"model"})):
        node = cfg.get(node_name)
        keys = {str(k) for k in node if k != "_target_"} if isinstance(node, DictConfig) else set()
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        if target:
            try:
                params = inspect.signature(get_object(str(target))).parameters.values()
            except Exception:  # noqa: BLE001 - the keys in the YAML still decide
                params = []
            keys |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                     and p.name not in skip | {"self"}}
        found.append(keys)
    return found[0], found[1]


# ---- --config file.yaml ---------------------------------------------------------------------------

def _read_config_file(state: _State, path: str) -> None:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError("no such file", where=f"--config {path}", hint="--config <a YAML file of overrides>")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else path
        raise ConfigError(f"not valid YAML ({getattr(err, 'problem', err)})", where=where) from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping such as `trainer: {max_steps: 100}`", where=path)
    for key, value in _flatten(data):
        where = f"{path}: {key}"
        if key == "trainer.callbacks":
            for spec in value if isinstance(value, list) else [] if value is None else [value]:
                _add_callback(state, spec, where)
        elif key.startswith("trainer.callbacks."):
            raise ConfigError("list trainer.callbacks with class_path and init_args per item", where=where,
                              hint="trainer: {callbacks: [{class_path: ..., init_args: {...}}]}")
        else:
            _translate(state, key, hydra_value(value), False, where)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings -> (dotted key, leaf); lists, and ``{class_path: ...}`` objects, are leaves."""
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and "class_path" not in value:
            items += _flatten(value, full + ".")
        elif isinstance(value, dict) and "class_path" in value:
            items.append((f"{full}.class_path", value["class_path"]))
            items += _flatten(dict(value.get("init_args") or {}), full + ".")
        else:
            items.append((full, value))
    return items


def _parse_yaml(value: str, where: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError("not a value YAML can read", where=where) from None
