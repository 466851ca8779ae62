"""No plugin imports another (issue 21): what several share is public core API (``modalforge.text``...).

A plugin that imports another cannot be moved into its own distribution by moving its
folder, and a change to one breaks the other unseen. Imports, dotted paths in code
strings (``get_object("modalforge.plugins...")``) and YAML ``_target_``s all count.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = sorted(p.parent for p in (ROOT / "plugins").glob("*/*/__init__.py") if (p.parent / "conf").is_dir())
#: ``modalforge.plugins.<modality>.<plugin>`` in a dotted path or an import.
PATH = re.compile(r"modalforge\.plugins\.([a-z_]+)\.([a-z0-9_]+)")

#: Edges still to invert (none now). The test fails both when a new edge appears and when a listed one is gone.
KNOWN_EDGES: set[tuple[str, str]] = set()


def _code_paths(source: str) -> list[str]:
    tree = ast.parse(source)
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
    return found


def edges() -> set[tuple[str, str]]:
    """(plugin, plugin it reaches into) for every plugin folder."""
    out = set()
    for folder in PLUGIN_DIRS:
        texts = [path for file in folder.rglob("*.py") for path in _code_paths(file.read_text())]
        texts += [file.read_text() for file in folder.rglob("*.yaml")]
        for text in texts:
            for _, other in PATH.findall(text):
                if other != folder.name:
                    out.add((folder.name, other))
    return out


def test_the_scan_finds_the_plugin_folders():
    names = {folder.name for folder in PLUGIN_DIRS}
    assert {"causal_lm", "sft", "dpo", "grpo", "clip", "vlm", "whisper_asr"} <= names


def test_no_plugin_reaches_into_another():
    found = edges()
    new = found - KNOWN_EDGES
    assert not new, f"plugins importing or naming other plugins' modules (move the shared part into the core): {new}"
    gone = KNOWN_EDGES - found
    assert not gone, f"no longer an edge, remove from KNOWN_EDGES: {sorted(gone)}"
