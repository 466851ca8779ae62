"""Checkpoints a user points at: readable, and fitting the model the config builds.

``ckpt_path`` may name a file that is not a checkpoint, or one cut short by a
full disk; torch answers both with advice about ``weights_only``. And a resume
with a changed model size fails inside ``load_state_dict`` with a screen of
``size mismatch`` lines. Both become one line here: the file, what is wrong,
and (the run's config is saved in every checkpoint) the config keys that
differ from the run that wrote it.

And a checkpoint may come from elsewhere: ``torch.load(weights_only=False)``
unpickles arbitrary objects, so a crafted file runs code on load. Every file is
read with ``weights_only=True`` (tensors, plain containers and numbers, and the
types in :data:`SAFE_GLOBALS`); one that needs more is refused with one line
naming the file, the objects and the switch ``checkpoint.trust=true``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from modalforge.errors import CheckpointError

#: Key under which the run's resolved config is stored in each checkpoint.
CONFIG_KEY = "modalforge_config"
_SIZE = re.compile(r"size mismatch for ([\w.\-]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) "
                   r"from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))")
_MISSING = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: \"([^\"]+)\"")


#: Types beyond tensors and plain values that the project's checkpoints hold. Measured by saving
#: a 2-step checkpoint of every built-in plugin (LoRA, QLoRA and 8-bit AdamW too) and listing
#: ``torch.serialization.get_unsafe_globals_in_checkpoint``: none. The run config is stored
#: resolved to plain containers, never as an omegaconf ``DictConfig``; RNG states are tensors
#: and lists. A plugin that stores a type of its own in checkpoints adds it with :func:`allow`.
SAFE_GLOBALS: list[Any] = []
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
TRUST_SWITCH = "checkpoint.trust=true"


def allow(*types: Any) -> None:
    """Let checkpoints hold ``types`` (a plugin's own plain classes) under ``weights_only=True``."""
    SAFE_GLOBALS.extend(t for t in types if t not in SAFE_GLOBALS)
    torch.serialization.add_safe_globals(list(types))  # Lightning's own resume load sees them too


def load_file(path: str, *, trust: bool = False, where: str | None = None, switch: str = TRUST_SWITCH) -> Any:
    """``torch.load`` that runs no code from the file unless ``trust``; a refusal names the file and ``switch``.

    Memory-mapped where the format allows (cheap for large files). Errors other than a
    refusal propagate as torch raises them.
    """
    try:
        return _load(path, weights_only=not trust)
    except pickle.UnpicklingError as err:
        if trust or "weights only load failed" not in str(err).lower():
            raise
        names = sorted(set(_GLOBAL.findall(str(err)))) or [
            next((l.strip() for l in str(err).splitlines() if "unsupported" in l.lower()), "non-tensor objects")]
        raise CheckpointError(f"holds objects that could run code when loaded ({', '.join(names)}): refused; "
                              f"{switch} loads it if you trust where it came from",
                              where=where or str(path)) from None


def _load(path: str, weights_only: bool) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)  # a legacy (non-zip) file


def read_checkpoint(path: str, *, trust: bool = False, switch: str = TRUST_SWITCH) -> dict[str, Any]:
    """Open ``path`` without running code from it (unless ``trust``), or raise ``CheckpointError`` naming it."""
    try:
        checkpoint = load_file(path, trust=trust, where=f"ckpt_path={path}", switch=switch)
    except CheckpointError:
        raise
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


def read_zero_checkpoint(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint folder as one checkpoint dict whose ``state_dict`` holds full fp32 weights.

    Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` merges the per-rank partitions (ZeRO-3)
    into the master weights and keeps Lightning's own state; its file is written beside the folder.
    """
    import tempfile

    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            return convert_zero_checkpoint_to_fp32_state_dict(path, Path(tmp) / "fp32.ckpt")
    except ModuleNotFoundError:
        raise CheckpointError("is a DeepSpeed checkpoint, and reading it needs deepspeed", where=str(path),
                              hint='pip install "modalforge[deepspeed]"') from None
