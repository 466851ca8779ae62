"""Training noise schedules and inference samplers, both diffusers schedulers, and the sampling loop.

The loop is the one every diffusers pipeline runs (``set_timesteps``, ``scale_model_input``,
the denoiser, ``step``), written once here so it works for unconditional, class-conditional
and text-conditional denoisers alike, with classifier-free guidance.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from modalforge.errors import ModalforgeError

Sampler = Literal["auto", "ddpm", "ddim", "dpm", "euler"]
DDPM_PREDICTIONS = ("epsilon", "v_prediction", "sample")
SAMPLER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler",
                   "euler": "EulerDiscreteScheduler"}
FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler",)


def build_noise_scheduler(prediction: str, *, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                          flow_shift: float = 1.0, pretrained: dict[str, Any] | None = None) -> Any:
    """The training schedule: ``DDPMScheduler`` (epsilon / v / sample) or ``FlowMatchEulerDiscreteScheduler`` (flow).

    A pretrained pipeline's scheduler config is reused; a prediction type that its scheduler
    family does not support is refused, naming ``objective.schedule.prediction_type`` and the scheduler.
    """
    import diffusers

    source = (pretrained or {}).get("_class_name")
    if source is not None:
        is_flow = source in FLOW_CLASSES
        if is_flow != (prediction == "flow"):
            supported = "flow" if is_flow else ", ".join(DDPM_PREDICTIONS)
            raise ModalforgeError(f"objective.schedule.prediction_type={prediction} is not supported by the pretrained "
                                  "pipeline's "
                                  f"scheduler {source} (it supports: {supported})")
    if prediction == "flow":
        if pretrained:
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(pretrained)
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    if pretrained:
        return diffusers.DDPMScheduler.from_config(pretrained, prediction_type=prediction)
    return diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                   prediction_type=prediction, clip_sample=False)


def build_sampler(name: Sampler, noise_scheduler: Any, prediction: str) -> Any:
    """The inference scheduler named by ``objective.evaluation.sampler`` (``auto``: DDIM, or Euler for flow)."""
    import diffusers

    if prediction == "flow":
        if name not in ("auto", "euler"):
            raise ModalforgeError(f"objective.evaluation.sampler={name} does not support "
                                  "objective.schedule.prediction_type=flow; use sampler=euler "
                                  "(FlowMatchEulerDiscreteScheduler) or auto")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
    name = "ddim" if name == "auto" else name
    cls = getattr(diffusers, SAMPLER_CLASSES[name])
    return cls.from_config(noise_scheduler.config, prediction_type=prediction)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return torch.cat([a, b]) if a is not None and b is not None else a


@torch.no_grad()
def sample_loop(denoiser: nn.Module, scheduler: Any, shape: tuple[int, ...], *, steps: int,
                generator: torch.Generator, class_labels: torch.Tensor | None = None,
                null_labels: torch.Tensor | None = None, states: torch.Tensor | None = None,
                null_states: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                null_pooled: torch.Tensor | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Denoise pure noise of ``shape`` in ``steps`` scheduler steps; returns the final sample.

    With ``guidance_scale != 1`` and a null condition (the null class or the empty caption's
    states), classifier-free guidance: ``uncond + scale * (cond - uncond)`` (Ho & Salimans 2022).
    Any diffusers denoiser: :func:`~.denoisers.denoise` maps the condition onto its signature.
    """
    from modalforge.plugins.vision.diffusion.denoisers import denoise

    param = next(denoiser.parameters())
    scheduler.set_timesteps(steps, device=param.device)
    x = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype)
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    guided = guidance_scale != 1.0 and (null_labels is not None or null_states is not None)
    condition = {"class_labels": class_labels, "states": states, "pooled": pooled}
    if guided:
        condition = {"class_labels": _cat(class_labels, null_labels), "states": _cat(states, null_states),
                     "pooled": _cat(pooled, null_pooled)}
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        if hasattr(scheduler, "scale_model_input"):
            model_in = scheduler.scale_model_input(model_in, t)
        out = denoise(denoiser, model_in, t, **condition)
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def make_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """``(N, C, H, W)`` in ``[0, 1]`` -> one ``(C, H', W')`` grid image, ``rows`` rows (torchvision)."""
    from torchvision.utils import make_grid as tv_make_grid

    per_row = max(1, -(-len(images) // max(rows, 1)))
    return tv_make_grid(images.float().cpu(), nrow=per_row, padding=2, pad_value=1.0)
