"""``full`` (train everything) and ``freeze`` (train only named modules: heads, linear probes)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from torch import nn

from modalforge.errors import ModalforgeError
from modalforge.interfaces import Adapter


def _save_full(module: nn.Module, directory: str | Path) -> None:
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(str(directory))
        return
    from safetensors.torch import save_model

    Path(directory).mkdir(parents=True, exist_ok=True)
    save_model(module, str(Path(directory) / "model.safetensors"))


class FullAdapter(Adapter):
    """Every parameter of the target trains."""

    def apply(self, module: nn.Module, default_targets: list[str] | str | None = None,
              heads: list[str] | None = None) -> nn.Module:
        module.requires_grad_(True)
        return module

    def save(self, module: nn.Module, directory: str | Path) -> None:
        _save_full(module, directory)


class FreezeAdapter(Adapter):
    """Freeze everything, then unfreeze modules or parameters whose qualified name matches a pattern.

    Args:
        trainable: ``fnmatch`` patterns over qualified names (``lm_head``, ``classifier``,
            ``model.layers.1*``); a module name matches its whole subtree.
    """

    def __init__(self, trainable: list[str]) -> None:
        if not trainable:
            raise ModalforgeError("adapter=freeze needs adapter.trainable=[<module names>], e.g. [lm_head]")
        self.trainable = list(trainable)

    def apply(self, module: nn.Module, default_targets: list[str] | str | None = None,
              heads: list[str] | None = None) -> nn.Module:
        module.requires_grad_(False)
        names = [n for n, _ in module.named_modules() if n] + [n for n, _ in module.named_parameters()]
        for pattern in self.trainable:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, f"*.{pattern}")]
            if not matched:
                top = sorted({n.split(".")[0] for n in names})[:20]
                raise ModalforgeError(f"adapter.trainable: '{pattern}' matches no module of {type(module).__name__}; "
                                      f"top-level modules: {top}")
            for name in matched:
                sub = dict(module.named_modules()).get(name)
                if sub is not None:
                    sub.requires_grad_(True)
                else:
                    dict(module.named_parameters())[name].requires_grad_(True)
        return module

    def save(self, module: nn.Module, directory: str | Path) -> None:
        _save_full(module, directory)
