"""Per-module learning rates: ``optim.param_groups``, an option of every plugin.

A run that joins pretrained parts (a vision tower, a projector, a language model)
wants each part at its own rate: the new projector fast, the pretrained tower slow.
Each entry names modules and the optimizer settings they get::

    optim.param_groups=[{modules: [vision_tower], lr: 1e-5}, {modules: [multi_modal_projector], lr: 1e-3}]

A module name matches a parameter when it is a run of whole components of the
parameter's dotted name (``vision_tower`` matches ``model.vision_tower.encoder.0.weight``,
not ``my_vision_tower_x.weight``); a name starting with ``re:`` is a regular expression
searched in the full name. The first entry that matches a parameter takes it; what no
entry matches keeps ``optim.lr``. Inside every group the usual rule holds: no weight
decay on biases, norms and other 1-D parameters.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from modalforge.errors import ModalforgeError

#: Keys of an entry besides ``modules``; all other optimizer group keys pass through too.
_ENTRY_HELP = "each entry is {modules: [name, ...], lr: <float>, weight_decay: <float, optional>}"


def _matcher(pattern: str):  # noqa: ANN202 - a predicate on parameter names
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.search(name) is not None
    wanted = f".{pattern.strip('.')}."
    return lambda name: wanted in f".{name}."


def _validate(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, entry in enumerate(entries):
        where = f"optim.param_groups[{i}]"
        if not isinstance(entry, Mapping):
            raise ModalforgeError(f"{where}: {entry!r} is not a mapping; {_ENTRY_HELP}")
        modules = entry.get("modules")
        if isinstance(modules, str):
            modules = [modules]
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ModalforgeError(f"{where}: 'modules' must be a non-empty list of module names; {_ENTRY_HELP}")
        for key in ("lr", "weight_decay"):
            if key in entry and not isinstance(entry[key], (int, float)):
                raise ModalforgeError(f"{where}.{key}: {entry[key]!r} is not a number")
        out.append({**dict(entry), "modules": list(modules)})
    return out


def build_param_groups(named_params: Iterable[tuple[str, nn.Parameter]], param_groups: Sequence[Mapping[str, Any]],
                       weight_decay: float) -> list[dict[str, Any]]:
    """Torch optimizer parameter groups: the default groups first, then one or two per entry.

    Args:
        named_params: ``module.named_parameters()``; frozen parameters are left out.
        param_groups: the ``optim.param_groups`` entries (``modules`` plus group settings such as ``lr``).
        weight_decay: ``optim.weight_decay``, used by entries that set none.

    Returns:
        Groups for ``torch.optim`` (each with ``params`` and ``weight_decay``, plus the entry's ``lr`` etc.).
        The default groups come first, so ``param_groups[0]`` carries ``optim.lr``.

    Raises:
        ModalforgeError: an entry is malformed, or one of its module names matches no parameter, or only
            frozen ones (a group that would silently train nothing).
    """
    from modalforge.optim import parameter_groups  # the decay / no-decay rule lives there

    named = list(named_params)
    entries = _validate(param_groups)
    if not entries:
        return parameter_groups(named, weight_decay)
    matchers = [[(pattern, _matcher(pattern)) for pattern in entry["modules"]] for entry in entries]
    hits: list[dict[str, int]] = [{pattern: 0 for pattern, _ in m} for m in matchers]
    frozen_hits: list[dict[str, int]] = [{pattern: 0 for pattern, _ in m} for m in matchers]
    assigned: list[list[tuple[str, nn.Parameter]]] = [[] for _ in entries]
    rest: list[tuple[str, nn.Parameter]] = []
    for name, param in named:
        owner = None
        for i, patterns in enumerate(matchers):
            for pattern, match in patterns:
                if match(name):
                    (hits if param.requires_grad else frozen_hits)[i][pattern] += 1
                    owner = i if owner is None else owner
        if not param.requires_grad:
            continue
        (assigned[owner] if owner is not None else rest).append((name, param))
    for i, entry in enumerate(entries):
        for pattern in entry["modules"]:
            if hits[i][pattern]:
                continue
            if frozen_hits[i][pattern]:
                raise ModalforgeError(
                    f"optim.param_groups[{i}]: module {pattern!r} matches only frozen parameters "
                    f"({frozen_hits[i][pattern]}); unfreeze it or remove the group")
            sample = ", ".join(sorted({n.rsplit(".", 2)[0] for n, _ in named})[:8])
            raise ModalforgeError(
                f"optim.param_groups[{i}]: module {pattern!r} matches no parameter of the model "
                f"(names look like: {sample}, ...); use a dotted module name or 're:<regex>'")
    groups = parameter_groups(rest, weight_decay) if any(p.requires_grad for _, p in rest) else []
    for entry, params in zip(entries, assigned):
        settings = {k: v for k, v in entry.items() if k != "modules"}
        decay = float(settings.pop("weight_decay", weight_decay))
        for group in parameter_groups(params, decay):
            groups.append({**group, **settings})
    return groups
