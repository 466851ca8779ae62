"""The contracts every plugin implements: Plugin, DataModule, Objective, Adapter.

A plugin is *data* (``DataModule``) + *what is learned* (``Objective``) +
default configs. *How parameters are trained* (``Adapter``) is chosen by the
user and applied by the core to the module the Objective names. The one
generic LightningModule (:mod:`modalforge.module`) joins them, so plugins never
subclass a LightningModule, call ``backward`` or move tensors to devices.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import lightning as L
import torch
from torch import nn

from modalforge.plugin import Plugin

__all__ = ["Adapter", "DataModule", "ModelObjective", "Objective", "Plugin", "StepOutput"]


@dataclass
class StepOutput:
    """What an Objective returns for one batch.

    Args:
        loss: scalar tensor to minimise (``None`` on validation if the objective has none).
        metrics: scalars to log, keyed by name without a stage prefix (``acc``, ``rewards/margin``).
        num_tokens: input tokens the model read, padding excluded (frames, patches... for other
            modalities), for ``train/tokens_per_s``: the same definition in every plugin, so runs
            compare. An int, or a 0-d tensor, which spares a device sync per step.
        batch_size: number of examples, so Lightning averages logged metrics correctly.
        num_learned_tokens: tokens the loss is computed on (labels that are not ignored: the
            assistant tokens in ``sft``, the completions in ``dpo``), for
            ``train/learned_tokens_per_s``; ``None`` when the loss is not per token.
        mean_over: the loss is a mean over this many items of the batch (learned tokens for a
            token loss, pairs for a pairwise one). The core then makes the optimizer step's loss
            the mean over *all* items of the step, over accumulated micro-batches and ranks, so
            batch size, accumulation and device count never change the gradient
            (:mod:`modalforge.scale.step_loss`). ``None``: a per-batch value, averaged per
            micro-batch as Lightning does.
    """

    loss: torch.Tensor | None
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    num_tokens: int | torch.Tensor | None = None
    batch_size: int | None = None
    num_learned_tokens: int | torch.Tensor | None = None
    mean_over: int | torch.Tensor | None = None


class DataModule(L.LightningDataModule, abc.ABC):
    """Turns a data config into batches: read, validate, preprocess, collate.

    Must work alone: ``dm.setup(); next(iter(dm.train_dataloader()))``.
    ``setup`` must therefore prepare whatever it needs (generate the synthetic demo
    set, train a tokenizer) if ``prepare_data`` has not run.
    """

    #: The processor the model needs (tokenizer, image processor, feature extractor...).
    #: Saved with the model so a run's output directory is loadable on its own.
    processor: Any = None

    def model_hints(self) -> dict[str, Any]:
        """Facts known only after reading data that the Objective needs to build its model
        (``vocab_size``, ``num_classes``, ``pad_token_id``...)."""
        return {}

    def save_processor(self, directory: str | Path) -> None:
        """Write the processor in Hugging Face format (``save_pretrained``) if there is one."""
        if self.processor is not None and hasattr(self.processor, "save_pretrained"):
            self.processor.save_pretrained(str(directory))

    def sample_inputs(self, n: int) -> list[Any]:
        """A few validation inputs (prompts, images...) for :meth:`Objective.sample`."""
        return []


class Objective(nn.Module, abc.ABC):
    """What is learned: builds its model(s) and turns a batch into a loss.

    An Objective is an ``nn.Module`` so that the models it builds (policy, frozen
    reference, VAE...) move with it, save with it and are wrapped by FSDP. It never
    calls ``backward`` and never touches devices or precision.

    Args:
        model: the ``model`` config node (builder ``_target_`` and kwargs, or ``name_or_path``).
    """

    #: ``module.loss_impl`` (set by the core before ``configure_model``): how a token loss over an LM
    #: head is computed; pass it to :func:`modalforge.losses.token_loss`.
    loss_impl: str = "auto"

    def __init__(self, model: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.model_config: dict[str, Any] = dict(model or {})
        self.datamodule: DataModule | None = None

    # ---- building -----------------------------------------------------------------
    def connect(self, datamodule: DataModule) -> None:
        """Bind late what is only known once data is set up (tokenizer, class count)."""
        self.datamodule = datamodule

    @abc.abstractmethod
    def configure_model(self) -> None:
        """Build the model(s). Called from Lightning's ``configure_model`` hook so that large
        models can be created under FSDP/DeepSpeed; must be idempotent."""

    @abc.abstractmethod
    def adapter_target(self) -> nn.Module:
        """The module the Adapter applies to (the policy, a CLIP tower, the UNet...)."""

    @abc.abstractmethod
    def set_adapter_target(self, module: nn.Module) -> None:
        """Put back the module returned by ``Adapter.apply`` (it may be a ``PeftModel``)."""

    def frozen_modules(self) -> Iterable[nn.Module]:
        """Helpers that are never trained (reference policy, VAE, text encoder).

        The core freezes them, keeps them out of the optimizer and out of adapter targets."""
        return ()

    def default_adapter_targets(self) -> list[str] | str | None:
        """Module names (PEFT ``target_modules``) that LoRA-style adapters apply to by default."""
        return "all-linear"

    def trainable_heads(self) -> list[str]:
        """Modules that must train in full under any PEFT adapter (a freshly sized classifier head).

        Passed to PEFT as ``modules_to_save`` unless the adapter config names its own."""
        return []

    def save_artifacts(self, directory: str | Path) -> None:
        """Extra outputs written beside the exported model (a confusion matrix, label names...)."""

    def block_classes(self) -> set[type[nn.Module]]:
        """Transformer block classes, for FSDP auto-wrap and activation checkpointing."""
        return set()

    def fsdp_forward_methods(self) -> list[str]:
        """Methods of the adapter target this Objective calls instead of ``forward``.

        Under ``strategy=fsdp`` the target is one sharded unit whose parameters are gathered
        when ``forward`` runs; a method named here gathers them too (``register_fsdp_forward_method``).
        ``generate`` by default; a CLIP model adds ``encode_image`` and ``encode_text``."""
        return ["generate"]

    # ---- steps --------------------------------------------------------------------
    @abc.abstractmethod
    def training_step(self, batch: Any) -> StepOutput:
        """Loss and metrics of one training batch."""

    def validation_step(self, batch: Any) -> StepOutput:
        """Loss and metrics of one validation batch; update owned torchmetrics here."""
        with torch.no_grad():
            return self.training_step(batch)

    def after_optimizer_step(self) -> None:
        """Runs after each optimizer step (e.g. clamp a learnable temperature, update an EMA)."""

    def validation_epoch_metrics(self) -> dict[str, torch.Tensor | float]:
        """Metrics computed over the whole validation set (``compute()`` + ``reset()`` owned metrics)."""
        return {}

    def sample(self, inputs: list[Any]) -> list[str]:
        """Human-readable samples (generated text, transcripts) for a few inputs.

        Called on every rank with the same inputs (a sharded model generates on all ranks
        together); rank zero writes what it returns."""
        return []

    def sample_images(self) -> dict[str, Any]:
        """Images for humans at each validation (a grid of generated samples...), keyed by name.

        Each value is a ``(C, H, W)`` float tensor in ``[0, 1]``. The core writes it to
        ``<run_dir>/images/<name>/step<N>.png`` and hands it to the loggers that show images
        (TensorBoard ``add_image``, Weights & Biases ``log_image``). Called on every rank after
        :meth:`validation_epoch_metrics` (a sharded model samples on all ranks together), so an
        Objective can keep what it sampled there; rank zero writes the images."""
        return {}

    # ---- saving -------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Save the trained model in its ecosystem's format (HF ``save_pretrained``...).

        The default saves the adapter target if it offers ``save_pretrained``."""
        target = self.adapter_target()
        if hasattr(target, "save_pretrained"):
            target.save_pretrained(str(directory))
        else:
            from safetensors.torch import save_model

            Path(directory).mkdir(parents=True, exist_ok=True)
            save_model(target, str(Path(directory) / "model.safetensors"))


class ModelObjective(Objective):
    """An Objective around one model, built from the ``model`` config and the DataModule's hints.

    Most paradigms train one model; they subclass this and write only their steps.
    ``build_model`` calls the config's ``_target_`` builder with the hints it accepts
    (``vocab_size``, ``num_classes``...). Override ``configure_model`` to build more.
    """

    def __init__(self, model: Mapping[str, Any] | None = None) -> None:
        super().__init__(model)
        self.model: nn.Module | None = None

    def configure_model(self) -> None:
        if self.model is None:
            from modalforge.models import build_model

            hints = self.datamodule.model_hints() if self.datamodule is not None else {}
            self.model = build_model(self.model_config, hints)

    def adapter_target(self) -> nn.Module:
        return self.model

    def set_adapter_target(self, module: nn.Module) -> None:
        self.model = module


class Adapter(abc.ABC):
    """How parameters are trained: full, freeze, or a PEFT method; works on any ``nn.Module``."""

    #: ``True`` when :meth:`apply` wraps the module in a ``peft.PeftModel``.
    is_peft: bool = False

    @abc.abstractmethod
    def apply(self, module: nn.Module, default_targets: list[str] | str | None = None,
              heads: list[str] | None = None) -> nn.Module:
        """Return the module to train, with ``requires_grad`` set on what must learn.

        Args:
            module: the Objective's adapter target.
            default_targets: the Objective's default ``target_modules``, used when the
                adapter config names none.
            heads: the Objective's ``trainable_heads``: PEFT adapters train them in full
                (``modules_to_save``) unless the adapter config names its own.
        """

    def save(self, module: nn.Module, directory: str | Path) -> None:
        """Save what was trained (PEFT format for PEFT adapters, full weights otherwise)."""
        if hasattr(module, "save_pretrained"):
            module.save_pretrained(str(directory))

    def merge(self, module: nn.Module) -> nn.Module:
        """Fold the adapter into the base weights, for export; identity for ``full``/``freeze``."""
        return module
