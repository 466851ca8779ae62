"""Plugin discovery through the entry point group ``modalforge.plugins``.

Built-in plugins are registered through the same group as third-party ones, so
the built-ins prove the public API. Discovery reads entry point metadata and
imports only each plugin's light package ``__init__`` (where the ``Plugin``
record lives); heavy code is imported when a plugin is selected.

Environment:
    MODALFORGE_PLUGINS: comma-separated names to load (others are ignored), or
        ``builtin`` to load only plugins shipped with modalforge. Unset: load all.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from modalforge.errors import ModalforgeError
from modalforge.plugin import Plugin

GROUP = "modalforge.plugins"
ENV_FILTER = "MODALFORGE_PLUGINS"


class PluginError(ModalforgeError):
    """A plugin is missing, duplicated or broken; the message says which and how to fix it."""


@dataclass(frozen=True)
class InstalledPlugin:
    """A discovered plugin and the distribution that provides it."""

    plugin: Plugin
    distribution: str
    version: str
    entry_point: str


def _distribution(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown>", "?"
    return dist.metadata["Name"], dist.version


def _wanted(ep: EntryPoint, dist_name: str) -> bool:
    selection = os.environ.get(ENV_FILTER, "").strip()
    if not selection:
        return True
    names = {s.strip() for s in selection.split(",") if s.strip()}
    return ep.name in names or ("builtin" in names and dist_name == "modalforge")


def _load(ep: EntryPoint) -> Plugin:
    obj = ep.load()
    plugin = obj() if callable(obj) and not isinstance(obj, Plugin) else obj
    if not isinstance(plugin, Plugin):
        raise TypeError(f"entry point {ep.value!r} gave {type(plugin).__name__}, expected modalforge.interfaces.Plugin")
    if plugin.name != ep.name:
        raise TypeError(f"entry point is named {ep.name!r} but its Plugin says name={plugin.name!r}")
    return plugin


#: Plugins whose import failed in the last discovery: name -> "distribution: error".
FAILED: dict[str, str] = {}


@lru_cache(maxsize=1)
def discover() -> dict[str, InstalledPlugin]:
    """All loadable plugins by name.

    A plugin whose import fails gives a warning naming it, its distribution and the
    error, and every other plugin still works (selecting it is an error, see ``get``).
    Two distributions offering one name is an error naming both (a silent winner
    would train the wrong thing).
    """
    FAILED.clear()
    found: dict[str, InstalledPlugin] = {}
    providers: dict[str, list[str]] = {}
    for ep in entry_points(group=GROUP):
        dist_name, version = _distribution(ep)
        if not _wanted(ep, dist_name):
            continue
        providers.setdefault(ep.name, []).append(f"{dist_name} ({ep.value})")
        try:
            plugin = _load(ep)
        except Exception as err:  # noqa: BLE001 - any import error of a third party must not break the others
            FAILED[ep.name] = f"distribution {dist_name!r}: {type(err).__name__}: {err}"
            warnings.warn(
                f"modalforge plugin {ep.name!r} from distribution {dist_name!r} could not be loaded: "
                f"{type(err).__name__}: {err}",
                stacklevel=2,
            )
            continue
        found[ep.name] = InstalledPlugin(plugin, dist_name, version, ep.value)
    duplicates = {name: dists for name, dists in providers.items() if len(set(dists)) > 1}
    if duplicates:
        lines = [f"  {name!r} is provided by: {', '.join(sorted(set(d)))}" for name, d in duplicates.items()]
        raise PluginError("two installed packages register the same plugin name:\n" + "\n".join(lines)
                          + "\nUninstall one of them, or restrict loading with MODALFORGE_PLUGINS=<names>.")
    return found


def available_names() -> list[str]:
    return sorted(discover())


def get(name: str) -> InstalledPlugin:
    """The plugin called ``name``, or an error listing the installed ones."""
    plugins = discover()
    if name in FAILED:
        raise PluginError(f"plugin {name!r} is installed but failed to load ({FAILED[name]}). "
                          "Reinstall or fix that package.")
    if name not in plugins:
        listing = ", ".join(sorted(plugins)) or "(none)"
        raise PluginError(
            f"unknown plugin {name!r}. Installed plugins: {listing}. "
            "Run `modalforge plugins` for details; a third-party plugin appears once its package is pip-installed."
        )
    return plugins[name]


def load_object(path: str) -> Any:
    """``"package.module:attribute"`` (or ``"package.module.attribute"``) imported and looked up."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


def hook(name: str, field: str) -> Any:
    """Plugin ``name``'s optional hook ``field`` (a dotted path on its record), imported now; None when unset.

    Raises:
        PluginError: the plugin is unknown, or its hook cannot be imported (the message names both).
    """
    path = getattr(get(name).plugin, field)
    if path is None:
        return None
    try:
        return load_object(path)
    except Exception as err:  # noqa: BLE001 - a third party's broken hook is named, not a traceback
        raise PluginError(f"plugin {name!r}: its {field} hook {path!r} cannot be loaded: "
                          f"{type(err).__name__}: {err}") from err


def hooks(field: str) -> dict[str, Any]:
    """Every installed plugin's hook ``field``, by name; a plugin without one is left out, and so
    (with a warning) is one whose hook fails to import, so the others still serve."""
    found: dict[str, Any] = {}
    for name, item in discover().items():
        if getattr(item.plugin, field) is None:
            continue
        try:
            found[name] = hook(name, field)
        except PluginError as err:
            warnings.warn(str(err), stacklevel=2)
    return found


def describe() -> str:
    """A table of installed plugins, for ``train`` without arguments and ``modalforge plugins``."""
    rows = [("name", "modality", "package", "description")]
    for name, item in sorted(discover().items()):
        rows.append((name, item.plugin.modality, f"{item.distribution} {item.version}", item.plugin.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)
