"""The record a plugin publishes; kept free of torch so listing plugins stays fast.

Plugin packages build this in their (light) ``__init__``; Hydra and
``modalforge plugins`` import those ``__init__`` files without training anything.
Optional hooks are dotted paths, imported only by the front-end that uses them
(``modalforge.registry.hook``), so discovery never imports them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plugin:
    """What a plugin publishes under the entry point group ``modalforge.plugins``.

    Args:
        name: the value of ``plugin=<name>`` on the command line.
        modality: ``text``, ``vision``, ``audio`` or ``multimodal`` (free text for third parties).
        description: one line shown by ``modalforge plugins``.
        conf_package: importable package holding the plugin's Hydra configs; it must contain
            ``plugin/<name>.yaml`` and may add namespaced options (``data/<name>/...``).
        datamodule: dotted path of the DataModule class (a string so listing imports nothing heavy).
        objective: dotted path of the Objective class.
        trl: optional ``"package.module:attribute"`` of a :class:`modalforge.cli.trl_config.TrlPlugin`:
            the TRL config classes the plugin reads with ``trl_config=<file>`` and its own argument
            handlers. None: the plugin takes no TRL config file.
    """

    name: str
    modality: str
    description: str
    conf_package: str
    datamodule: str
    objective: str
    trl: str | None = None
