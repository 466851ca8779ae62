"""The tasks of a multitask run: each an ordinary plugin config, composed like ``train plugin=<name>``.

``tasks`` is a list of plugin names, or of mappings ``{plugin, name, weight, overrides}``.
Each task's config is composed from the plugin's own defaults plus its overrides, and
validated like any run's, so a task is configured exactly as it would be alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from modalforge.errors import ConfigError


@dataclass(frozen=True)
class Task:
    """One task: its name (the prefix of its metrics and module paths), plugin, weight and overrides."""

    name: str
    plugin: str
    weight: float = 1.0
    overrides: tuple[str, ...] = field(default_factory=tuple)


def parse_tasks(spec: Any) -> list[Task]:
    """``tasks`` as written by the user, checked: at least two, positive weights, distinct names."""
    if isinstance(spec, (DictConfig,)) or not isinstance(spec, Sequence) or isinstance(spec, str):
        spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
    if isinstance(spec, str) or not isinstance(spec, Sequence) or len(spec) < 1:
        raise ConfigError("expected a list of plugin names or {plugin, name, weight, overrides} mappings",
                          where="tasks", hint="e.g. tasks=[clip,causal_lm]")
    tasks: list[Task] = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            item = {"plugin": item}
        if not isinstance(item, Mapping) or "plugin" not in item:
            raise ConfigError("a task needs a 'plugin'", where=f"tasks[{i}]")
        unknown = sorted(set(item) - {"plugin", "name", "weight", "overrides"})
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} (a task has plugin, name, weight, overrides)",
                              where=f"tasks[{i}]")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"weight {weight!r} must be a number > 0", where=f"tasks[{i}].weight")
        if item["plugin"] == "multitask":
            raise ConfigError("a multitask run cannot contain another multitask run", where=f"tasks[{i}]")
        overrides = item.get("overrides") or []
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError("overrides is a list of key=value strings", where=f"tasks[{i}].overrides")
        tasks.append(Task(str(item.get("name") or item["plugin"]), str(item["plugin"]), float(weight),
                          tuple(overrides)))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError("two tasks have the same name: give one a 'name'", where="tasks")
    return tasks


def task_config(task: Task) -> DictConfig:
    """The task's full config, as ``train plugin=<plugin> <overrides>`` would compose it (validated)."""
    from hydra.core.global_hydra import GlobalHydra

    from modalforge.validate import validate_config

    overrides = [f"plugin={task.plugin}", *task.overrides]
    try:
        if GlobalHydra.instance().is_initialized():  # inside `train`: compose with the running app's search path
            from hydra import compose

            cfg = compose("train", overrides=overrides)
        else:
            from modalforge.config import compose as compose_fresh

            cfg = compose_fresh(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors
        raise ConfigError(f"cannot compose task {task.name!r}: {str(err).splitlines()[0]}",
                          where=f"tasks.{task.name}") from None
    try:
        validate_config(cfg)
    except ConfigError as err:
        raise ConfigError(err.what, where=f"tasks.{task.name}: {err.where}", hint=err.hint) from None
    return cfg
