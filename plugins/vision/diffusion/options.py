"""The option groups of ``DiffusionObjective``, one typed dataclass each (in the spirit of TRL's configs).

``objective.conditioning.*``, ``objective.schedule.*``, ``objective.loss.*``, ``objective.ema.*``,
``objective.evaluation.*`` and ``objective.prior.*`` in the config. Each group's keys, types and
``Literal`` choices are checked by the core's signature check (``modalforge.validate.check_call``
on the group's class), so ``objective.ema.decy=0.9`` is a config error that names ``decay`` and every
valid key, and a wrong choice lists the allowed ones; nothing here repeats those checks by hand.
Only what a signature cannot say (a range, two options that exclude each other) is checked here.
"""

# No ``from __future__ import annotations``: the core reads these hints from the dataclasses' __init__.
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, TypeVar

from modalforge.errors import ConfigError
from modalforge.plugins.vision.diffusion.sampling import Sampler

Prediction = Literal["epsilon", "v_prediction", "sample", "flow"]


@dataclass(frozen=True)
class ConditioningOptions:
    """``objective.conditioning``: what the denoiser is conditioned on.

    Args:
        kind: ``none``, ``class`` (the ``label`` field -> class embeddings) or ``text`` (captions ->
            frozen text encoder -> cross-attention); ``data.conditioning`` follows it.
        caption_dropout: each training example's condition is dropped (caption -> ``""``, label -> the
            null class) with this probability, so classifier-free guidance can sample without it.
    """

    kind: Literal["none", "class", "text"] = "class"
    caption_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"{self.caption_dropout} must be in [0, 1)", where="objective.conditioning.caption_dropout")


@dataclass(frozen=True)
class ScheduleOptions:
    """``objective.schedule``: the training noise schedule and how its timesteps are drawn.

    Args:
        prediction_type: what the denoiser outputs: ``epsilon`` (DDPM), ``v_prediction`` (Salimans &
            Ho 2022), ``sample`` (x0) or ``flow`` (rectified flow / flow matching, as SD3).
        beta_schedule / num_train_timesteps: the DDPM noise schedule (not used by ``flow``).
        timestep_sampling: ``uniform``, ``logit_normal`` (SD3) or ``mode``; logit_mean / logit_std /
            mode_scale parameterise them.
        flow_shift: SD3's timestep shift of the flow schedule.
    """

    prediction_type: Prediction = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float = 1.0


@dataclass(frozen=True)
class LossOptions:
    """``objective.loss``: weightings and perturbations of the denoising loss (see ``losses.py``).

    Args:
        snr_gamma: min-SNR-gamma weighting (5.0 in the paper), DDPM predictions only; ``None`` disables.
        flow_weighting: ``none``, ``sigma_sqrt`` or ``cosmap`` (SD3's loss weightings of ``flow``).
        noise_offset: offset-noise strength (0.05-0.1 usual); 0 disables.
        input_perturbation: input-perturbation strength (0.1 in the paper); 0 disables.
    """

    snr_gamma: float | None = None
    flow_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    noise_offset: float = 0.0
    input_perturbation: float = 0.0


@dataclass(frozen=True)
class EMAOptions:
    """``objective.ema``: an EMA of the trained weights, checkpointed, used for samples and the export.

    Args:
        decay: e.g. 0.999; ``None`` disables the EMA.
        update_after_step: optimizer steps before the EMA starts.
    """

    decay: float | None = None
    update_after_step: int = 0

    def __post_init__(self) -> None:
        if self.decay is not None and not 0.0 < self.decay < 1.0:
            raise ConfigError(f"{self.decay} must be in (0, 1) (or null to disable)", where="objective.ema.decay")


@dataclass(frozen=True)
class EvaluationOptions:
    """``objective.evaluation``: the fixed-seed sample grid of each validation and its scores.

    Args:
        samples_per_class: samples per class (class conditioning; otherwise the grid holds this number
            squared); 0 disables sampling, FID/KID and accuracy.
        sampler: inference scheduler of the grids and of the export: ``auto`` (DDIM, Euler for flow),
            ``ddpm``, ``ddim``, ``dpm`` (DPM-Solver++), ``euler``.
        sample_steps / guidance_scale / seed: of the grid (guidance needs
            ``objective.conditioning.caption_dropout`` > 0 in training to learn the unconditional case).
        timestep_buckets: validation loss is also logged per bucket of timesteps.
        fid_features: ``auto``, ``inception``, ``random``, ``none``, or an image_classification or clip ``final/``.
        fid_real_images: validation images in the FID / KID reference set.
        classifier: an image_classification run's ``final/``: logs ``sample_class_acc``.
    """

    samples_per_class: int = 6
    sampler: Sampler = "auto"
    sample_steps: int = 25
    guidance_scale: float = 1.0
    seed: int = 0
    timestep_buckets: int = 4
    fid_features: str = "auto"
    fid_real_images: int = 360
    classifier: str | None = None


@dataclass(frozen=True)
class PriorOptions:
    """``objective.prior``: DreamBooth prior preservation (needs ``objective.conditioning.kind=text``).

    Args:
        loss_weight: > 0 turns it on (1.0 in the paper): each step also denoises as many class images
            captioned ``class_prompt`` and adds this weight times their MSE
            (``losses.prior_preservation_loss``).
        class_prompt / class_data_dir / num_class_images: the class prompt, the folder of class images,
            and how many it must hold (missing ones are generated by the base model).
    """

    loss_weight: float = 0.0
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int = 100

    def __post_init__(self) -> None:
        if not self.loss_weight:
            return
        missing = [f"objective.prior.{k}" for k in ("class_prompt", "class_data_dir") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"{self.loss_weight} needs {' and '.join(missing)} (the class images' folder; "
                              "missing images are generated there)", where="objective.prior.loss_weight")


G = TypeVar("G")


def option_group(cls: type[G], value: "G | Mapping[str, Any] | None", name: str) -> G:
    """``objective.<name>`` as ``cls``: a mapping is checked by the core's signature check, then built."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    where = f"objective.{name}"
    if not isinstance(value, Mapping):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        raise ConfigError(f"{value!r} is not a group of options", where=where, hint=f"its keys: {fields}")
    from modalforge.validate import check_call

    check_call(where, f"{cls.__module__}.{cls.__qualname__}", value)
    return cls(**value)
