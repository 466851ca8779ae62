"""``strategy=fsdp``: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``.

FSDP2 runs on CPU processes (gloo) as on GPUs (NCCL), so every plugin's sharded
path is tested on machines without a GPU. What is sharded, and why:

- each module of the plugin's block classes (``Objective.block_classes``), in the
  trained model and in frozen helpers (a reference policy) alike: the bulk of the
  parameters, gathered one block at a time;
- the adapter target (the trained model) as the root unit, with the methods the
  Objective calls on it instead of ``forward`` (``generate``, a CLIP tower's
  ``encode_image``) registered as forward methods, so that they gather too;
- everything else (a VAE, a value head beside the policy) stays replicated: frozen
  ones need no synchronisation, trainable ones get their gradients averaged over
  ranks before the optimizer step (:meth:`FSDP2Strategy.sync_replicated_gradients`).

Checkpoints are one full file by default (gathered to rank zero and written
atomically; any number of processes can resume from it, and every tool reads it);
``strategy.distributed_checkpoint=true`` writes ``torch.distributed.checkpoint``
folders instead, for models too large to gather. A frozen helper's weights are
left out of checkpoints (the Objective rebuilds them), which a strict load allows
here exactly for those keys.
"""

from __future__ import annotations

import datetime
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from modalforge.errors import ConfigError

#: What ``trainer.precision`` FSDP2 runs with (Lightning's ModelParallelStrategy refuses 16-mixed).
SUPPORTED_PRECISION = ("32-true", "bf16-mixed", "bf16-true", "16-true")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes (no tensor parallelism), sharding the plugin's blocks and its model.

    Args:
        block_classes: the plugin's transformer block classes, each instance its own FSDP unit.
        reshard_after_forward: ``True`` frees gathered parameters after each block's forward
            (full shard, least memory); ``False`` keeps them to backward (grad-op sharding, fewer gathers).
        activation_checkpointing: recompute each block's activations in backward.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        shard_size: processes that shard one copy of the model; the copies are replicated over
            the rest (hybrid sharding: ``shard_size`` = GPUs per node is the usual choice). ``None``: all.
        distributed_checkpoint: write ``torch.distributed.checkpoint`` folders instead of one full file.
        timeout: seconds a collective may wait before the run fails (a hung or dead rank).
    """

    def __init__(self, block_classes: Iterable[type[nn.Module]] = (), *, reshard_after_forward: bool = True,
                 activation_checkpointing: bool = False, cpu_offload: bool = False, shard_size: int | None = None,
                 distributed_checkpoint: bool = False, timeout: float = 1800.0) -> None:
        super().__init__(save_distributed_checkpoint=distributed_checkpoint,
                         timeout=datetime.timedelta(seconds=float(timeout)))
        self.block_classes = tuple(block_classes)
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.cpu_offload = cpu_offload
        self.shard_size = shard_size
        self._replicated: list[nn.Parameter] = []

    # ---- processes and mesh -------------------------------------------------------
    def setup_environment(self) -> None:
        # Data parallel over every process: Lightning's default would make the GPUs of a node a
        # tensor-parallel group.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        # Lightning's launcher starts the other ranks before it sets the thread count (on rank zero
        # only); ModelParallelStrategy, unlike DDP, never sets it, so each child would take every core.
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        _set_num_threads_if_needed(num_processes=self.num_processes)
        super().setup_environment()

    def _shard_mesh(self):  # noqa: ANN202 - DeviceMesh
        world = self.world_size
        if not self.shard_size or self.shard_size >= world:
            return self.device_mesh["data_parallel"]
        if world % self.shard_size:
            raise ConfigError(f"{self.shard_size} does not divide the {world} processes", where="strategy.shard_size")
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.root_device.type, (world // self.shard_size, self.shard_size),
                                mesh_dim_names=("replicate", "shard"))

    # ---- sharding -------------------------------------------------------------------
    def setup(self, trainer) -> None:  # noqa: ANN001 - lightning.Trainer
        # Lightning has called configure_model (the models exist, adapters applied); shard before
        # it materialises the module and builds the optimizer over the sharded parameters.
        self.shard(self.lightning_module)
        super().setup(trainer)

    def _mp_policy(self):  # noqa: ANN202
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = str(self.precision_plugin.precision) if self.precision_plugin is not None else "32-true"
        if precision not in SUPPORTED_PRECISION:
            raise ConfigError(f"strategy=fsdp runs with {', '.join(SUPPORTED_PRECISION)}, not {precision!r}",
                              where="trainer.precision")
        if precision == "bf16-mixed":
            # Blocks compute in bf16; gradients are reduced in fp32, and the sharded master weights stay fp32.
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def shard(self, module: nn.Module) -> None:
        """Apply ``fully_shard`` to the blocks and the adapter target of ``module.objective``."""
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

        objective = module.objective
        if getattr(objective, "_fsdp2_sharded", False):
            return
        blocks = self.block_classes
        if not blocks:
            warnings.warn("strategy=fsdp: the plugin names no block classes (Objective.block_classes), so only its "
                          "model as a whole is one FSDP unit: gathered at once, no per-block activation "
                          "checkpointing", stacklevel=2)
        if self.activation_checkpointing and blocks:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            apply_activation_checkpointing(objective, check_fn=lambda m: isinstance(m, blocks))
        from modalforge.adapters import check_fsdp_quant_storage

        policy = self._mp_policy()
        check_fsdp_quant_storage(objective, policy.param_dtype)  # QLoRA: 4-bit bytes FSDP2 would cast as numbers
        kwargs: dict[str, Any] = {"mesh": self._shard_mesh(), "reshard_after_forward": self.reshard_after_forward,
                                  "mp_policy": policy}
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        scalars = {p for p in objective.parameters() if p.ndim == 0}
        if scalars:  # fully_shard refuses 0-d parameters (CLIP's logit_scale): they stay replicated
            kwargs["ignored_params"] = scalars
        units = [m for m in objective.modules() if blocks and isinstance(m, blocks)]
        for unit in reversed(units):  # innermost first
            fully_shard(unit, **kwargs)
        for target in _root_units(objective.adapter_target()):
            fully_shard(target, **kwargs)
            for name in _forward_methods(objective, target):
                register_fsdp_forward_method(target, name)
        self._replicated = [p for p in objective.parameters() if p.requires_grad and not _is_sharded(p)]
        objective._fsdp2_sharded = True

    def sync_replicated_gradients(self, module: nn.Module) -> None:
        """Average over ranks the gradients of trainable parameters outside every FSDP unit."""
        grads = [p.grad for p in self._replicated if p.grad is not None]
        if not grads or self.world_size < 2:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm(self, parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm over sharded (DTensor) and replicated (plain) gradients.

        torch's ``clip_grad_norm_`` refuses a list mixing the two (a value head beside a sharded
        policy, CLIP's scalar ``logit_scale``): the norms are taken per kind, the sharded one
        reduced to its full value, and the gradients scaled in place by one factor.
        """
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in parameters if p.grad is not None]
        sharded = [g for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        squares = torch.zeros((), dtype=torch.float64)
        if sharded:
            norm = torch.nn.utils.get_total_norm(sharded)
            squares += (norm.full_tensor() if isinstance(norm, DTensor) else norm).double().cpu() ** 2
        if plain:
            squares += torch.nn.utils.get_total_norm(plain).double().cpu() ** 2
        total = squares.sqrt()
        coef = float(max_norm) / (float(total) + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return total

    # ---- checkpoints ----------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))  # a collective: every rank, before rank zero writes alone
        if path.is_dir():
            shutil.rmtree(path)  # an earlier distributed checkpoint of the same name
        if self.is_global_zero:
            # One full file (rank zero holds the gathered state), written beside and renamed: a crash
            # mid-write leaves the previous checkpoint whole.
            tmp = path.with_name(path.name + ".tmp")
            self.checkpoint_io.save_checkpoint(checkpoint, tmp, storage_options=storage_options)
            tmp.replace(path)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        from modalforge.module import _is_bnb_quant_state

        module = self.lightning_module
        frozen = tuple(module._frozen_prefixes()) if hasattr(module, "_frozen_prefixes") else ()
        safe = weights_only is not False  # checkpoint.trust=true passes False; otherwise no code runs on load
        if frozen and path.is_file():
            saved = torch.load(path, map_location="cpu", mmap=True, weights_only=safe)["state_dict"]
            missing = [k for k in module.state_dict() if k not in saved and not _is_bnb_quant_state(k)]
            unexpected = [k for k in missing if not k.startswith(frozen)]
            if unexpected:
                raise RuntimeError(f'Error(s) in loading state_dict for {type(module).__name__}:\n\t'
                                   f'Missing key(s) in state_dict: "{unexpected[0]}"')
            strict, module.strict_loading = module.strict_loading, False  # only the frozen helpers' keys are absent
            try:
                return super().load_checkpoint(path, weights_only=safe)
            finally:
                module.strict_loading = strict
        return super().load_checkpoint(path, weights_only=safe)


def _is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def _has_parameters(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def _root_units(target: nn.Module | None) -> list[nn.Module]:
    """The adapter target, or each model of a container of them (multitask's ModuleDict has no forward)."""
    if isinstance(target, (nn.ModuleDict, nn.ModuleList)):
        return [m for m in (target.values() if isinstance(target, nn.ModuleDict) else target) if _has_parameters(m)]
    return [target] if _has_parameters(target) else []


def _forward_methods(objective: nn.Module, target: nn.Module) -> list[str]:
    names = list(getattr(objective, "fsdp_forward_methods", lambda: ["generate"])())
    return [n for n in names if callable(getattr(target, n, None))]
