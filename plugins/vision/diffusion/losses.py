"""Noise, targets and loss weightings of the denoising objectives, as small testable functions.

Each function is one paper's formula; the library does the schedule arithmetic where it
can (diffusers' ``compute_snr``, ``get_velocity``, ``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``). ``tests/test_diffusion.py`` checks every weighting
against the paper's formula computed by hand on a small tensor.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]


def _randn(like: torch.Tensor, shape: tuple[int, ...] | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(shape or like.shape, generator=generator, device=like.device, dtype=like.dtype)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The paper weights the x0-space loss by ``min(SNR, gamma)``; expressed for the quantity
    the network predicts: epsilon divides by ``SNR``, v by ``SNR + 1``, x0 keeps it as is.
    The same form as diffusers' ``train_text_to_image.py``.
    """
    clipped = torch.minimum(snr, torch.full_like(snr, float(gamma)))
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v_prediction":
        return clipped / (snr + 1)
    if prediction == "sample":
        return clipped
    raise ValueError(f"min-SNR weighting is defined for epsilon, v_prediction and sample, not {prediction!r}")


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise offset (Guttenberg 2023, "Diffusion with Offset Noise"): add ``offset * N(0, 1)`` per
    (image, channel), constant over the pixels, so the model learns to change mean brightness."""
    if offset <= 0:
        return noise
    return noise + offset * _randn(noise, (noise.shape[0], noise.shape[1], *([1] * (noise.ndim - 2))), generator)


def perturb_noise(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion
    Models"): the noisy input is built from ``noise + gamma * xi`` while the target stays ``noise``."""
    if gamma <= 0:
        return noise
    return noise + gamma * _randn(noise, generator=generator)


def timestep_fractions(scheme: Literal["uniform", "logit_normal", "mode"], batch_size: int, *,
                       logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                       device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """``u`` in ``[0, 1)`` per example: uniform, logit-normal (SD3, Esser et al. 2024) or mode sampling."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(scheme if scheme != "uniform" else "none", batch_size,
                                                 logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                                                 device=device, generator=generator)


def ddpm_target(scheduler: Any, prediction: Prediction, sample: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to output under a DDPM-family schedule."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(sample, noise, timesteps)
    if prediction == "sample":
        return sample
    raise ValueError(f"prediction={prediction!r} has no DDPM target")


def flow_interpolate(sample: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow as SD3 trains it: ``x_t = (1 - sigma) x0 + sigma * noise``, target ``noise - x0``."""
    while sigmas.ndim < sample.ndim:
        sigmas = sigmas[..., None]
    return (1.0 - sigmas) * sample + sigmas * noise, noise - sample


def flow_weights(scheme: Literal["none", "sigma_sqrt", "cosmap"], sigmas: torch.Tensor) -> torch.Tensor:
    """SD3's flow-matching loss weights (diffusers ``compute_loss_weighting_for_sd3``)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(scheme, sigmas)


def prior_preservation_loss(weighted: torch.Tensor, mse: torch.Tensor, n_instance: int,
                            prior_loss_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth's loss (Ruiz et al. 2023) as diffusers' ``train_dreambooth.py`` computes it.

    The batch holds the instance examples, then as many class examples (the script's
    ``torch.chunk(model_pred, 2)``). The instance loss is the (optionally min-SNR weighted) mean
    MSE of the first half, the prior loss the plain mean MSE of the second, and
    ``loss = instance + prior_loss_weight * prior``. Per-example means averaged equal the script's
    ``F.mse_loss(..., reduction="mean")``, every example having the same number of elements.

    Returns:
        (loss, instance loss, prior loss).
    """
    instance = weighted[:n_instance].mean()
    prior = mse[n_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior
