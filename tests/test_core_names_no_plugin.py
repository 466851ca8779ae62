"""The core names no plugin (issue 21): what it needs from one comes from that plugin's hooks.

A built-in plugin's name (an entry point in ``pyproject.toml``) in ``core/`` code means
a branch a third-party plugin could not get without patching the core. Docstrings and
comments may name plugins as examples; string literals and imports in code may not.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
                 ["modalforge.plugins"])
#: A name as a whole word: ``model=dpo/pretrained`` and ``[clip,causal_lm]`` count, ``gradient_clip_val`` does not.
WORD = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, PLUGINS)) + r")(?![A-Za-z0-9_])")
#: Plain English in core messages that happens to spell a plugin's name, and the reward spec scheme
#: ``reward_model:/path`` (any HF sequence classifier, :mod:`modalforge.rl.rewards`), not a branch on the plugin.
PROSE = ("to clip", "reward_model:")

def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def plugin_mentions(source: str) -> list[tuple[int, str]]:
    """(line, plugin name) for every name in code: string literals and ``modalforge.plugins.*`` paths.

    Docstrings (any string that stands alone as a statement) and comments do not count; local
    variable names do not either (``clip = ...`` in audio code is not the plugin).
    """
    tree = ast.parse(source)
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            texts = [node.value]
            for phrase in PROSE:
                texts = [t.replace(phrase, "") for t in texts]
        elif isinstance(node, ast.Import):
            texts = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            texts = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            texts = [_dotted(node)]
        else:
            continue
        if not isinstance(node, ast.Constant):  # a module path: only modalforge.plugins.* names a plugin
            texts = [t for t in texts if "plugins" in t.split(".")]
        found += [(getattr(node, "lineno", 0), match) for text in texts for match in WORD.findall(text)]
    return found


def _offenders() -> dict[str, list[tuple[int, str]]]:
    out = {}
    for path in sorted((ROOT / "core").rglob("*.py")):
        mentions = plugin_mentions(path.read_text())
        if mentions:
            out[path.relative_to(ROOT).as_posix()] = mentions
    return out


def test_the_scan_sees_code_and_skips_docstrings_and_comments():
    source = '''
"""Module docstring: plugin=dpo."""
import modalforge.plugins.text.sft.data  # a comment naming clip
from modalforge.plugins.text import grpo


def f(clip):
    """Docstring: train plugin=vlm."""
    "a bare string, also documentation: ppo"
    gradient_clip_val = clip.clip(0, 1)
    return {"plugin": "diffusion", "help": f"e.g. tasks=[wav2vec2,{clip}]", "why": "refuses to clip"}
'''
    assert sorted(name for _, name in plugin_mentions(source)) == ["diffusion", "grpo", "sft", "wav2vec2"]


def test_trl_config_names_no_plugin():
    assert plugin_mentions((ROOT / "core" / "cli" / "trl_config.py").read_text()) == []


def test_no_core_file_names_a_plugin():
    found = _offenders()
    assert not found, f"core files naming plugins (use a Plugin hook instead): {found}"
