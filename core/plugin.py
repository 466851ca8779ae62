"""The record a plugin publishes; kept free of torch so listing plugins stays fast.

Plugin packages build this in their (light) ``__init__``; Hydra and
``modalforge plugins`` import those ``__init__`` files without training anything.
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
    """

    name: str
    modality: str
    description: str
    conf_package: str
    datamodule: str
    objective: str
