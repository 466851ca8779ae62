"""The one LightningModule: joins an Objective, an Adapter and the optimizer.

Plugins never subclass it. It builds the model(s) late (``configure_model``, so
FSDP/DeepSpeed can shard them at creation), applies the adapter to the module
the Objective names, keeps frozen helpers frozen and out of checkpoints, builds
the optimizer over trainable parameters only, and logs what the Objective reports.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from modalforge.compile import compile_in_place, compile_mode
from modalforge.interfaces import Adapter, DataModule, Objective, StepOutput
from modalforge.optim import build_optimizer, build_scheduler, clips_scaled_gradients
from modalforge.scale.ranks import rank_world
from modalforge.scale.step_loss import StepLoss

log = logging.getLogger(__name__)


class TrainingModule(L.LightningModule):
    """Generic training wrapper; see the module docstring.

    Args:
        objective: what is learned (owns the models and metrics).
        adapter: how parameters are trained (full, freeze, LoRA...).
        optim: the ``optim`` config (see ``conf/train.yaml``).
        gradient_checkpointing: trade compute for activation memory.
        num_samples: human-readable samples produced at each validation.
        compile: ``torch.compile`` in place: ``true``/``blocks`` each repeated block (regional), ``model`` the
            whole adapter target, false: eager (:mod:`modalforge.compile`).
        loss_impl: how Objectives compute token losses (:data:`modalforge.losses.LOSS_IMPLS`), set on the Objective.
    """

    def __init__(
        self,
        objective: Objective,
        adapter: Adapter,
        optim: Mapping[str, Any],
        *,
        gradient_checkpointing: bool = False,
        num_samples: int = 3,
        compile: bool | str = False,
        loss_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.objective = objective
        self.loss_impl = loss_impl
        self.adapter = adapter
        self.optim_config = dict(optim)
        self.gradient_checkpointing = gradient_checkpointing
        self.num_samples = num_samples
        self.compile_mode = compile_mode(compile)
        self.last_num_tokens: int | None = None
        self.last_batch_size: int | None = None
        self.last_num_learned_tokens: int | torch.Tensor | None = None
        #: The last micro-batch's loss as the Objective computed it (a mean over its items).
        self.last_loss: torch.Tensor | None = None
        self.step_loss = StepLoss()
        #: The run's resolved config (set by ``run``), saved in checkpoints so that a resume
        #: that does not fit can name the config keys that changed.
        self.run_config: dict[str, Any] | None = None
        self._configured = False

    # ---- model building ---------------------------------------------------------------
    def _datamodule(self) -> DataModule | None:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return dm if dm is not None else self.objective.datamodule

    def configure_model(self) -> None:
        if self._configured:
            return
        datamodule = self._datamodule()
        if datamodule is not None:
            self.objective.connect(datamodule)
        for objective in self.objective.modules():  # the Objective, and any it holds (one per task)
            if isinstance(objective, Objective):
                objective.loss_impl = self.loss_impl
        from modalforge.adapters import pretrained_loading  # what the adapter asks of from_pretrained (qlora: 4 bits)

        with pretrained_loading(self.adapter, getattr(self._trainer, "precision", None)):
            self.objective.configure_model()
        target = self.adapter.apply(self.objective.adapter_target(), self.objective.default_adapter_targets(),
                                    self.objective.trainable_heads())
        if self.gradient_checkpointing:
            from modalforge.adapters import enable_gradient_checkpointing

            enable_gradient_checkpointing(target)
        if self.compile_mode is not None:
            compile_in_place(target, self.objective.block_classes(), self.compile_mode)
        self.objective.set_adapter_target(target)
        # After the adapter: `full` unfreezes its whole target, which may contain a frozen helper
        # (a locked CLIP tower); frozen always wins.
        for helper in self.objective.frozen_modules():
            helper.requires_grad_(False)
            helper.eval()
        # from_pretrained returns models in eval mode and Lightning keeps module modes as they are.
        self.train(self.training)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        rank_zero_info(f"[modalforge] parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
        self._configured = True

    def train(self, mode: bool = True) -> "TrainingModule":
        # Lightning puts the whole module in train mode at each fit/validation switch;
        # frozen helpers (reference policy, VAE) must keep dropout and norms in eval.
        super().train(mode)
        for helper in self.objective.frozen_modules():
            helper.eval()
        return self

    def _frozen_prefixes(self) -> list[str]:
        frozen = {id(m) for m in self.objective.frozen_modules()}
        return [f"{name}." for name, module in self.named_modules() if id(module) in frozen]

    # ---- steps ------------------------------------------------------------------------
    def _log_output(self, stage: str, out: StepOutput, **kwargs: Any) -> None:
        on_step = stage == "train"
        sync = stage != "train"
        if out.loss is not None:
            self.log(f"{stage}/loss", out.loss.detach(), prog_bar=stage in ("train", "val"), on_step=on_step,
                     on_epoch=not on_step, batch_size=out.batch_size, sync_dist=sync, **kwargs)
        for key, value in out.metrics.items():
            self.log(f"{stage}/{key}", value, on_step=on_step, on_epoch=not on_step, batch_size=out.batch_size,
                     sync_dist=sync, **kwargs)

    def _log_source_counts(self) -> None:
        # A mixture of sources: how many examples each has given this epoch (data/<source>/seen).
        loader = getattr(self.trainer.fit_loop, "_combined_loader", None)
        flat = getattr(loader, "flattened", None) or []
        counts = flat[0].source_counts() if flat and hasattr(flat[0], "source_counts") else None
        for name, count in (counts or {}).items():
            self.log(f"data/{name}/seen", float(count), on_step=True, on_epoch=False, batch_size=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self.objective.training_step(batch)
        if out.loss is None or not out.loss.requires_grad:
            raise RuntimeError(
                f"{type(self.objective).__name__}.training_step returned a loss without a graph; "
                "is every parameter frozen (adapter) or was the loss computed under no_grad?"
            )
        self.last_num_tokens, self.last_batch_size = out.num_tokens, out.batch_size
        self.last_num_learned_tokens = out.num_learned_tokens
        self.last_loss = out.loss.detach()
        loss = self.step_loss.micro_batch(out.loss, out.mean_over, rescale=self._rescales_gradients())
        if self._logs_this_step():
            # train/loss is the step's (all micro-batches and ranks): logged in on_before_optimizer_step
            self._log_output("train", StepOutput(loss=None, metrics=out.metrics, batch_size=out.batch_size))
            self._log_source_counts()
            # train/lr: callbacks.throughput.ThroughputLogger writes it straight to the loggers (cheaper than self.log)
        return loss

    def _rescales_gradients(self) -> bool:
        # DeepSpeed owns the gradients (accumulated and reduced inside its engine): there a
        # micro-batch keeps its own mean, as Lightning does.
        trainer = self._trainer
        return trainer is None or "DeepSpeed" not in type(trainer.strategy).__name__

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After the last micro-batch's backward and the ranks' gradient reduction, before clipping.
        trainer = self.trainer
        sync = getattr(trainer.strategy, "sync_replicated_gradients", None)
        if sync is not None:
            sync(self)
        world = int(trainer.world_size)
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        loss = self.step_loss.finish(self.parameters(), world_size=world,
                                     accumulate=int(trainer.accumulate_grad_batches), all_reduce=reduce)
        if loss is not None and self._logs_this_step():
            self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip = getattr(self.trainer.strategy, "clip_grad_norm", None)
        if clip is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            # FSDP2: sharded and replicated gradients side by side, which torch's clip_grad_norm_ refuses
            clip([p for group in optimizer.param_groups for p in group["params"]], float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _logs_this_step(self) -> bool:
        # Loggers only write every `log_every_n_steps`; skipping self.log in between saves
        # a measurable share of a small model's step time (benchmarks/overhead.py).
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return False
        every = max(1, int(trainer.log_every_n_steps or 1))
        return (trainer.fit_loop.epoch_loop._batches_that_stepped + 1) % every == 0

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self.objective.validation_step(batch)
        names = getattr(self._datamodule(), "val_names", None) or []
        if len(names) > 1:
            # Several named validation sets: each under val/<name>/..., the first also as val/... (for
            # checkpoint monitoring and tools that read val/loss).
            self._log_output(f"val/{names[dataloader_idx]}", out, add_dataloader_idx=False)
            if dataloader_idx == 0:
                self._log_output("val", out, add_dataloader_idx=False)
        else:
            self._log_output("val", out)

    def on_validation_epoch_end(self) -> None:
        for key, value in self.objective.validation_epoch_metrics().items():
            self.log(f"val/{key}", value, sync_dist=True, prog_bar=key in ("ppl", "acc", "wer", "recall@1"))
        if self.num_samples and not self.trainer.sanity_checking:
            self._log_samples()
        if not self.trainer.sanity_checking:
            self._log_images()

    def _log_samples(self) -> None:
        datamodule = self._datamodule()
        inputs = datamodule.sample_inputs(self.num_samples) if datamodule is not None else []
        if not inputs:
            return
        samples = self.objective.sample(inputs)  # every rank: a sharded model generates together
        # trainer.log_dir is a broadcast (a collective) in Lightning: every rank reads it, or rank zero waits alone.
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if not samples or not self.trainer.is_global_zero:
            return
        step = self.global_step
        lines = "\n".join(f"  [{i}] {text!r}" for i, text in enumerate(samples))
        rank_zero_info(f"[modalforge] samples at step {step}:\n{lines}")
        path = Path(log_dir) / "samples.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            for i, text in enumerate(samples):
                handle.write(json.dumps({"step": step, "index": i, "input": str(inputs[i]), "sample": text}) + "\n")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("samples", lines, step)

    def _log_images(self) -> None:
        # Objective.sample_images: PNGs under <run_dir>/images/<name>/, and to loggers that show images.
        images = self.objective.sample_images()  # every rank (see Objective.sample_images)
        if not images or not self.trainer.is_global_zero:
            return
        from torchvision.utils import save_image  # only objectives that make images ask for this

        step = self.global_step
        for name, image in images.items():
            image = image.detach().float().cpu()
            path = Path(self.trainer.default_root_dir) / "images" / name / f"step{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, str(path))
            for logger in self.loggers:
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "add_image"):
                    experiment.add_image(name, image, step)
                elif hasattr(logger, "log_image"):
                    logger.log_image(key=name, images=[str(path)], step=step)

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this right after optimizer.step()
        self.objective.after_optimizer_step()

    # ---- optimisation -----------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.named_parameters(), self.optim_config,
                                    unscale_before_step=clips_scaled_gradients(self.trainer))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else int(
            self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(optimizer, self.optim_config, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._align_data_position(checkpoint)
        if self.run_config is not None:
            from modalforge.checkpoints import CONFIG_KEY

            checkpoint[CONFIG_KEY] = self.run_config
        # Frozen helpers are rebuilt from their source by configure_model; storing them
        # again in every checkpoint would double its size for a reference policy.
        prefixes = tuple(self._frozen_prefixes())
        if prefixes:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(prefixes)]:
                del state[key]
        self._save_rank_extra_states(checkpoint)

    # A module's ``get_extra_state`` (grpo's rollout buffer) may be its rank's own, and the state dict holds
    # rank zero's; FSDP2's load (Lightning's, parameters and buffers only) does not restore it at all.
    def _extra_state_modules(self) -> dict[str, nn.Module]:
        frozen = tuple(self._frozen_prefixes())
        keys = {f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE: module for name, module in self.named_modules()
                if type(module).get_extra_state is not nn.Module.get_extra_state}
        return {k: m for k, m in keys.items() if not k.startswith(frozen)} if frozen else keys

    def _save_rank_extra_states(self, checkpoint: dict[str, Any]) -> None:
        # Lightning dumps a checkpoint on every rank (rank zero writes it): a collective is safe here.
        modules = self._extra_state_modules()
        if not modules:
            return
        from lightning.fabric.utilities.apply_func import move_data_to_device

        own = move_data_to_device({key: module.get_extra_state() for key, module in modules.items()}, "cpu")
        _, world = rank_world()
        states: list[Any] = [own]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, own)
        checkpoint[RANK_EXTRA_STATES_KEY] = states

    def _load_rank_extra_states(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RANK_EXTRA_STATES_KEY)
        if not states:
            return
        rank, world = rank_world()
        if len(states) == world:  # this rank's own
            own = states[rank]
        elif checkpoint.get("state_dict") is None:  # another process count under FSDP2: what the state dict held
            own = states[0]
        else:  # another process count: the state dict's (rank zero's), as it stands
            return
        modules = self._extra_state_modules()
        state = checkpoint.get("state_dict")
        for key, value in own.items():
            if state is not None:  # DDP, one process: loaded with the state dict, after this hook
                state[key] = value
            elif key in modules:  # FSDP2: the strategy has loaded the rest already
                modules[key].set_extra_state(value)

    def _align_data_position(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written on Ctrl-C may come after a batch was fetched but before it was
        # trained; resume must replay that batch, so the data position is the processed count.
        trainer = self._trainer
        states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
        if trainer is None or not states:
            return
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for state in states:
            if isinstance(state, dict) and "batches_yielded" in state:
                state["batches_yielded"] = min(int(state["batches_yielded"]), int(processed))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # bitsandbytes saves each 4-bit weight's quantisation state as extra keys that its own
        # Linear4bit does not accept back into an already-quantised layer; the frozen 4-bit base
        # is rebuilt identically by configure_model, so those keys carry nothing to restore.
        self._load_rank_extra_states(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:  # FSDP2 (ModelParallelStrategy) loaded the weights into the sharded model itself
            return
        for key in [k for k in state if _is_bnb_quant_state(k)]:
            del state[key]
        prefixes = tuple(self._frozen_prefixes())
        if prefixes:
            for key, value in self.state_dict().items():
                if key.startswith(prefixes) and key not in state:
                    state[key] = value

    # ---- export -----------------------------------------------------------------------
    def is_sharded(self) -> bool:
        """Whether a strategy sharded the parameters (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions):
        exports must gather first."""
        from torch.distributed.tensor import DTensor

        return _zero_stage(self._trainer) == 3 or any(isinstance(p, DTensor) for p in self.parameters())

    def _zero3_state(self) -> dict[str, Any] | None:
        # ZeRO-3 partitions every parameter over the ranks; Lightning's conversion of a ZeRO checkpoint
        # (all ranks write it) gathers the fp32 master weights on rank zero.
        import shutil

        folder = Path(self.trainer.default_root_dir) / "checkpoints" / ".export-zero3"
        self.trainer.save_checkpoint(str(folder))
        self.trainer.strategy.barrier()
        if not self.trainer.is_global_zero:
            return None
        from modalforge.checkpoints import read_zero_checkpoint

        try:
            return read_zero_checkpoint(folder)["state_dict"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def gathered_copy(self) -> "TrainingModule | None":
        """A plain, unsharded copy holding the full trained weights on rank zero (``None`` elsewhere).

        Every rank must call it: the weights are gathered by a collective. The copy is built from
        the run's config like the original (its adapter applied) and loads the gathered state
        strictly, so what it exports equals the training weights."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if _zero_stage(self._trainer) == 3:
            state = self._zero3_state()
        else:
            state = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.trainer.is_global_zero:
            return None
        if self.run_config is None:
            raise RuntimeError("gathered_copy needs the run's config (TrainingModule.run_config, set by run())")
        from omegaconf import OmegaConf

        from modalforge.run import build_components, build_module

        cfg = OmegaConf.create(self.run_config)
        _, objective, adapter = build_components(cfg)
        datamodule = self._datamodule()
        if datamodule is not None:
            objective.connect(datamodule)
        copy = build_module(cfg, objective, adapter)
        copy.run_config = self.run_config
        copy.configure_model()
        checkpoint = {"state_dict": state}
        copy.on_load_checkpoint(checkpoint)  # as a resume does: 4-bit quantisation state dropped, frozen helpers filled
        copy.load_state_dict(checkpoint["state_dict"], strict=True)
        return copy

    def export(self, directory: str | Path, *, merge: bool = False) -> Path:
        """Write the trained model (or adapter) and the processor in HF / PEFT format."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = self.objective.adapter_target()
        if self.adapter.is_peft and not merge:
            self.adapter.save(target, directory)
        else:
            if self.adapter.is_peft:
                self.objective.set_adapter_target(self.adapter.merge(target))
            self.objective.save_pretrained(directory)
        datamodule = self._datamodule()
        if datamodule is not None:
            datamodule.save_processor(directory)
        self.objective.save_artifacts(directory)
        return directory


#: Checkpoint key: every rank's ``get_extra_state`` values, by state-dict key, in rank order.
RANK_EXTRA_STATES_KEY = "modalforge_rank_extra_states"
_EXTRA_STATE = "_extra_state"  # torch's suffix of a module's extra state in its state dict


_BNB_QUANT_STATE_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.")


def _is_bnb_quant_state(key: str) -> bool:
    return any(part in key for part in _BNB_QUANT_STATE_PARTS)


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return (sum(p.numel() for p in module.parameters() if p.requires_grad), sum(p.numel() for p in module.parameters()))


def _zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy (``None`` under any other, or outside a run)."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    config = getattr(strategy, "config", None) if "DeepSpeed" in type(strategy).__name__ else None
    if not isinstance(config, dict):
        return None
    return int((config.get("zero_optimization") or {}).get("stage", 0))
