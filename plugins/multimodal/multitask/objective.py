"""multitask objective: several plugins' Objectives in one module, one optimiser, modules shared by name.

Each task's Objective is built from its own config exactly as in a single-plugin run
and connected to its own DataModule. ``share`` names pairs of module paths
(``<task>.<path inside its Objective>``); after the models are built the second
becomes the very same module object as the first, so one set of weights gets the
gradients of both tasks (``named_parameters`` lists it once, so the optimiser holds
it once). Shapes are checked first: two modules with different parameter shapes
are an error naming both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from modalforge.errors import ConfigError
from modalforge.interfaces import DataModule, Objective, StepOutput
from modalforge.plugins.multimodal.multitask.tasks import parse_tasks, task_config


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), leaf


class MultiTaskObjective(Objective):
    """Holds one Objective per task and trains them together.

    Args:
        model: unused (each task's ``model`` node comes from its own plugin config).
        tasks: as ``MultiTaskDataModule``'s.
        mix: ``sample`` (the batch's task only) or ``sum`` (every task's loss, weighted, each step).
        share: pairs ``[<task>.<module path>, <task>.<module path>]`` that become one module.
    """

    def __init__(self, model: Mapping[str, Any] | None = None, tasks: Any = None,
                 mix: Literal["sample", "sum"] = "sample", share: Sequence[Sequence[str]] = ()) -> None:
        super().__init__(model)
        self.tasks = parse_tasks(tasks)
        self.mix = mix
        self.weights = {t.name: t.weight for t in self.tasks}
        self.share = [tuple(pair) for pair in share]
        for i, pair in enumerate(self.share):
            if len(pair) != 2 or not all(isinstance(p, str) and "." in p for p in pair):
                raise ConfigError("each entry is a pair [<task>.<module path>, <task>.<module path>]",
                                  where=f"objective.share[{i}]")
            for path in pair:
                if path.split(".", 1)[0] not in self.weights:
                    raise ConfigError(f"{path!r} starts with no task name (tasks: {', '.join(self.weights)})",
                                      where=f"objective.share[{i}]")
        objectives = {}
        for task in self.tasks:
            cfg = task_config(task)
            model_cfg = OmegaConf.to_container(cfg.model, resolve=True) if cfg.get("model") is not None else {}
            objectives[task.name] = instantiate(cfg.objective, _partial_=True, _convert_="all")(model=model_cfg)
        self.objectives = nn.ModuleDict(objectives)

    # ---- building -----------------------------------------------------------------
    def connect(self, datamodule: DataModule) -> None:
        super().connect(datamodule)
        for name, objective in self.objectives.items():
            objective.connect(datamodule.datamodules[name])  # type: ignore[attr-defined]

    def configure_model(self) -> None:
        for objective in self.objectives.values():
            objective.configure_model()

    def adapter_target(self) -> nn.Module:
        return nn.ModuleDict({name: o.adapter_target() for name, o in self.objectives.items()})

    def set_adapter_target(self, module: nn.Module) -> None:
        for name, objective in self.objectives.items():
            objective.set_adapter_target(module[name])  # type: ignore[index]
        self._share_modules()

    def _share_modules(self) -> None:
        for i, (first, second) in enumerate(self.share):
            try:
                keep = self.objectives.get_submodule(first)
                parent, leaf = _parent(self.objectives, second)
                other = getattr(parent, leaf)
            except AttributeError as err:
                raise ConfigError(f"no module {err}", where=f"objective.share[{i}]",
                                  hint="module paths are <task>.<path in that task's Objective>, "
                                       "e.g. causal_lm.model.model.layers") from None
            mine = {k: tuple(v.shape) for k, v in keep.state_dict().items()}
            theirs = {k: tuple(v.shape) for k, v in other.state_dict().items()}
            if mine != theirs:
                diff = next((k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)), "?")
                raise ConfigError(f"{first} and {second} do not have the same parameters: {diff} is "
                                  f"{mine.get(diff)} in the first and {theirs.get(diff)} in the second",
                                  where=f"objective.share[{i}]")
            setattr(parent, leaf, keep)

    def frozen_modules(self) -> Iterable[nn.Module]:
        return [m for o in self.objectives.values() for m in o.frozen_modules()]

    def default_adapter_targets(self) -> list[str] | str | None:
        targets = [o.default_adapter_targets() for o in self.objectives.values()]
        return "all-linear" if any(t == "all-linear" for t in targets) else sorted(
            {x for t in targets if isinstance(t, list) for x in t}) or None

    def trainable_heads(self) -> list[str]:
        return [f"{name}.{head}" for name, o in self.objectives.items() for head in o.trainable_heads()]

    def block_classes(self) -> set[type[nn.Module]]:
        return set().union(*(o.block_classes() for o in self.objectives.values()))

    # ---- steps --------------------------------------------------------------------
    def _step(self, name: str, batch: Any, train: bool) -> StepOutput:
        objective = self.objectives[name]
        return objective.training_step(batch) if train else objective.validation_step(batch)

    def training_step(self, batch: dict[str, Any]) -> StepOutput:
        if "tasks" in batch:  # mix=sum: every task, weighted
            outs = {name: self._step(name, b, True) for name, b in batch["tasks"].items()}
            loss = sum(self.weights[n] * o.loss for n, o in outs.items())
        else:
            outs = {batch["task"]: self._step(batch["task"], batch["batch"], True)}
            loss = next(iter(outs.values())).loss
        metrics: dict[str, Any] = {}
        for name, out in outs.items():
            metrics[f"{name}/loss"] = out.loss.detach()
            metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
        tokens = [o.num_tokens for o in outs.values() if o.num_tokens is not None]
        return StepOutput(loss=loss, metrics=metrics, num_tokens=sum(tokens) if tokens else None,
                          batch_size=sum(o.batch_size or 0 for o in outs.values()) or None)

    def validation_step(self, batch: dict[str, Any]) -> StepOutput:
        # The core logs each task's validation set as val/<task>/... (one dataloader per task).
        return self._step(batch["task"], batch["batch"], False)

    def after_optimizer_step(self) -> None:
        for objective in self.objectives.values():
            objective.after_optimizer_step()

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor | float]:
        return {f"{name}/{k}": v for name, o in self.objectives.items()
                for k, v in o.validation_epoch_metrics().items()}

    # ---- saving -------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Each task's model in its own ecosystem's format, under ``<directory>/<task>/``."""
        for name, objective in self.objectives.items():
            objective.save_pretrained(Path(directory) / name)

    def save_artifacts(self, directory: str | Path) -> None:
        for name, objective in self.objectives.items():
            objective.save_artifacts(Path(directory) / name)
