"""diffusion export: ``final/`` as a diffusers pipeline folder (EMA weights applied), ``labels.json``, the
last sample grid and a diffusers LoRA beside a PEFT adapter, as a mixin of ``DiffusionObjective``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from modalforge.plugins.vision.diffusion.denoisers import base_model

log = logging.getLogger(__name__)


class DiffusionExport:
    """``save_pretrained`` / ``save_artifacts`` of ``DiffusionObjective``."""

    def export_pipeline(self) -> Any:
        """A diffusers pipeline of the trained denoiser (EMA weights applied by the caller) and its helpers."""
        import copy

        from diffusers import DDPMPipeline, DiTPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

        from modalforge.plugins.vision.diffusion.denoisers import PipelinePromptEncoder

        denoiser = copy.deepcopy(base_model(self.denoiser))
        if hasattr(denoiser, "merge_and_unload"):
            denoiser = denoiser.merge_and_unload()
        scheduler = copy.deepcopy(self.sampler)
        kind = type(denoiser).__name__
        if kind == "DiTTransformer2DModel" and self.vae is not None:
            id2label = {i: name for i, name in enumerate(self.classes)} or None
            return DiTPipeline(transformer=denoiser, vae=self.vae, scheduler=scheduler, id2label=id2label)
        if kind == "SD3Transformer2DModel" and isinstance(self.text_encoder, PipelinePromptEncoder):
            parts = {k: v for k, v in self.text_encoder.pipe.components.items()
                     if k not in ("transformer", "scheduler", "vae")}
            return StableDiffusion3Pipeline(transformer=denoiser, vae=self.vae, scheduler=scheduler, **parts)
        if kind.startswith("UNet") and self.vae is None and self.text_encoder is None:
            return DDPMPipeline(unet=denoiser, scheduler=scheduler)
        from transformers import PreTrainedModel

        if kind.startswith("UNet") and self.vae is not None and isinstance(self.text_encoder, PreTrainedModel):
            return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                           tokenizer=self.datamodule.processor, unet=denoiser, scheduler=scheduler,
                                           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        raise NotImplementedError  # handled by save_pretrained

    def save_pretrained(self, directory: str | Path) -> None:
        """A diffusers pipeline folder: ``DDPMPipeline`` in pixel space (unconditional or class-conditional
        UNet), ``StableDiffusionPipeline`` with a VAE and a text encoder, ``DiTPipeline`` (DiT with a VAE),
        ``StableDiffusion3Pipeline`` (SD3 from a pipeline); otherwise each component in its sub-folder
        (``unet/`` or ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._ema_applied():
            try:
                self.export_pipeline().save_pretrained(str(directory))
                return
            except NotImplementedError:
                pass
            denoiser = base_model(self.denoiser)
            sub = "unet" if type(denoiser).__name__.startswith("UNet") else "transformer"
            denoiser.save_pretrained(str(directory / sub))
        self.sampler.save_pretrained(str(directory / "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(str(directory / "vae"))
        if self.text_encoder is not None and hasattr(self.text_encoder, "save_pretrained"):
            self.text_encoder.save_pretrained(str(directory / "text_encoder"))
            self.datamodule.processor.save_pretrained(str(directory / "tokenizer"))

    def save_artifacts(self, directory: str | Path) -> None:
        """``labels.json`` (class index -> name; the null class of guidance is the index after the last),
        the last validation grid as ``samples.png``, and, beside an unmerged LoRA adapter, the same
        LoRA (EMA weights when on) as ``pytorch_lora_weights.safetensors`` for ``pipeline.load_lora_weights``."""
        from modalforge.plugins.vision.diffusion.lora_export import is_peft, save_diffusers_lora

        directory = Path(directory)
        if self.conditioning.kind == "class":
            (directory / "labels.json").write_text(json.dumps(self.classes, indent=1))
        if self._grid is not None:
            from torchvision.utils import save_image

            save_image(self._grid, str(directory / "samples.png"))
        denoiser = getattr(self.denoiser, "_orig_mod", self.denoiser)
        if is_peft(denoiser) and (directory / "adapter_config.json").exists():
            with self._ema_applied():
                if self.ema is not None:
                    denoiser.save_pretrained(str(directory))  # the PEFT adapter again, with the EMA weights
                written = save_diffusers_lora(denoiser, directory)
            if written is None:
                log.info("diffusion: no diffusers LoRA loader for %s; final/ holds the PEFT adapter only",
                         type(denoiser.get_base_model()).__name__)
