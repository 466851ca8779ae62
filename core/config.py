"""Hydra wiring: the config search path of every installed plugin, and the schemas.

Discovery happens once, before Hydra composes, so that ``plugin=<name>`` resolves
for built-in and installed plugins alike. Each plugin's ``conf_package`` is appended
to the search path through a ``SearchPathPlugin`` registered programmatically
(Hydra's public ``Plugins.instance().register``; no ``hydra_plugins`` namespace
package, which breaks under editable installs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from modalforge import registry
from modalforge.trainer_schema import trainer_schema

ROOT_CONF = "pkg://modalforge.conf"


class PluginConfSearchPath(SearchPathPlugin):
    """Appends ``pkg://<conf_package>`` of every discovered plugin."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for name, item in sorted(registry.discover().items()):
            search_path.append(provider=f"modalforge-plugin-{name}", path=f"pkg://{item.plugin.conf_package}")


_registered = False


def register() -> None:
    """Register the search path plugin and the structured schemas (idempotent)."""
    global _registered
    if _registered:
        return
    Plugins.instance().register(PluginConfSearchPath)
    ConfigStore.instance().store(group="trainer", name="schema", node=trainer_schema())
    _registered = True


def compose(overrides: Sequence[str] = (), *, return_hydra_config: bool = False) -> Any:
    """Compose the real ``train`` config outside the CLI (tests, notebooks).

    Example:
        ``cfg = compose(["plugin=causal_lm", "trainer.max_steps=5"])``
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="modalforge.conf", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def conf_root() -> Path:
    """Folder of the core config package (for tests that scan shipped YAML)."""
    import modalforge.conf

    return Path(modalforge.conf.__file__).parent
