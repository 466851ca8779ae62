"""Checkpoints a user points at: readable, and fitting the model the config builds.

``ckpt_path`` may name a file that is not a checkpoint, or one cut short by a
full disk; torch answers both with advice about ``weights_only``. And a resume
with a changed model size fails inside ``load_state_dict`` with a screen of
``size mismatch`` lines. Both become one line here: the file, what is wrong,
and (the run's config is saved in every checkpoint) the config keys that
differ from the run that wrote it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from modalforge.errors import CheckpointError

#: Key under which the run's resolved config is stored in each checkpoint.
CONFIG_KEY = "modalforge_config"
_SIZE = re.compile(r"size mismatch for ([\w.\-]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) "
                   r"from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))")
_MISSING = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"")


def read_checkpoint(path: str) -> dict[str, Any]:
    """Open ``path`` (memory-mapped: cheap for large files) or raise ``CheckpointError`` naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same to the user
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"not a readable checkpoint (truncated, or not written by torch/Lightning): {detail}",
                              where=f"ckpt_path={path}",
                              hint="point ckpt_path at a .ckpt under <run_dir>/checkpoints, or use ckpt_path=last") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError("is a torch file but not a Lightning checkpoint (no 'state_dict')",
                              where=f"ckpt_path={path}",
                              hint="to start from a model's weights use model.name_or_path=<a final/ folder> instead")
    return checkpoint


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def config_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any], sections: tuple[str, ...] = (
        "model", "data", "adapter", "objective")) -> list[str]:
    """``key: old -> new`` for keys of ``sections`` that differ between two run configs."""
    if not old:
        return []
    before, after = _flatten({s: old.get(s) for s in sections}), _flatten({s: new.get(s) for s in sections})
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k) and not k.endswith(("cache_dir", "num_workers"))]


def explain_load_error(err: BaseException, path: str, old_config: Mapping[str, Any] | None,
                       new_config: Mapping[str, Any]) -> CheckpointError | None:
    """A one-line ``CheckpointError`` for a state-dict mismatch, or ``None`` if ``err`` is something else."""
    text = str(err)
    if "Error(s) in loading state_dict" not in text:
        return None
    changes = config_changes(old_config, new_config)
    hint = ("config keys that differ from the checkpoint's run: " + "; ".join(changes[:3])) if changes else (
        "resume with the same model settings as the run that wrote it (see its .hydra/config.yaml)")
    size = _SIZE.search(text)
    if size:
        name, saved, current = size.groups()
        return CheckpointError(f"does not fit the model: parameter {name} is {saved[11:-1]} in the checkpoint but "
                               f"{current[11:-1]} in the model this config builds", where=f"ckpt_path={path}", hint=hint)
    missing = _MISSING.search(text)
    if missing:
        kind, name = missing.groups()
        what = "missing from the checkpoint" if kind == "Missing" else "in the checkpoint but not in the model"
        return CheckpointError(f"does not fit the model: parameter {name} is {what}", where=f"ckpt_path={path}",
                               hint=hint)
    return CheckpointError(f"does not fit the model: {text.splitlines()[0]}", where=f"ckpt_path={path}", hint=hint)
