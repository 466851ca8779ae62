"""diffusion: weightings against their papers, the conformance suite, EMA resume, export, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from modalforge.config import compose
from modalforge.data.errors import DataError
from modalforge.errors import ModalforgeError
from modalforge.plugins.vision.diffusion import losses
from modalforge.plugins.vision.diffusion.data import DiffusionDataModule
from modalforge.run import run
from modalforge.testing import assert_plugin_conforms

from cli_helpers import FAST, series

pytest.importorskip("diffusers")

# small batches, a 2-step sampler and a small FID reference set keep each run to seconds
QUICK = ["data.batch_size=8", "optim.warmup_steps=0", "objective.evaluation.sample_steps=2", "objective.evaluation.samples_per_class=2",
         "objective.evaluation.fid_real_images=16"]


@pytest.fixture(scope="module")
def shapes() -> Path:
    dm = DiffusionDataModule()
    dm.prepare_data()
    return dm._synthetic()


# ---- weightings, by hand -------------------------------------------------------------------
def test_min_snr_weights_match_the_paper():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=10, beta_start=0.01, beta_end=0.2, beta_schedule="linear")
    t = torch.tensor([0, 3, 9])
    betas = torch.linspace(0.01, 0.2, 10, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[t]
    snr = alpha_bar / (1 - alpha_bar)  # SNR(t) = alpha_bar / (1 - alpha_bar)  (Hang et al. 2023, eq. 3)
    torch.testing.assert_close(compute_snr(scheduler, t).double(), snr, rtol=1e-5, atol=0)
    gamma = 5.0
    # x0-space weight min(SNR, gamma); for epsilon it becomes min(SNR, gamma) / SNR, for v min(SNR, gamma) / (SNR + 1)
    expected = {"sample": [min(s, gamma) for s in snr.tolist()],
                "epsilon": [min(s, gamma) / s for s in snr.tolist()],
                "v_prediction": [min(s, gamma) / (s + 1) for s in snr.tolist()]}
    for prediction, values in expected.items():
        got = losses.min_snr_weights(snr, gamma, prediction)
        torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64))
    assert snr[0] > gamma > snr[2]  # the chosen timesteps exercise both sides of the clip
    with pytest.raises(ValueError):
        losses.min_snr_weights(snr, gamma, "flow")


def test_noise_offset_and_input_perturbation_match_their_papers():
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    # offset noise: noise + 0.1 * N(0, 1) drawn once per (image, channel), constant over pixels
    got = losses.offset_noise(noise, 0.1, torch.Generator().manual_seed(1))
    per_channel = torch.randn(2, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, noise + 0.1 * per_channel)
    assert torch.allclose((got - noise).std(dim=(2, 3)), torch.zeros(2, 3), atol=1e-6)
    # input perturbation: the network input uses noise + gamma * xi (xi ~ N(0, 1) per pixel)
    got = losses.perturb_noise(noise, 0.1, torch.Generator().manual_seed(2))
    xi = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, noise + 0.1 * xi)
    assert losses.offset_noise(noise, 0.0) is noise and losses.perturb_noise(noise, 0.0) is noise


def test_flow_matching_and_logit_normal_match_sd3():
    x0, noise = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    sigma = torch.tensor([0.25, 0.75])
    noisy, target = losses.flow_interpolate(x0, noise, sigma)
    torch.testing.assert_close(noisy[:, 0, 0, 0], torch.tensor([0.75 * 2 - 0.25, 0.25 * 2 - 0.75]))
    torch.testing.assert_close(target, noise - x0)
    # logit-normal: u = sigmoid(n), n ~ N(m, s)  (Esser et al. 2024, eq. 19)
    u = losses.timestep_fractions("logit_normal", 4, logit_mean=0.5, logit_std=2.0,
                                  generator=torch.Generator().manual_seed(3))
    n = torch.normal(0.5, 2.0, size=(4,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(u, torch.sigmoid(n))
    # cosmap weighting: 2 / (pi * (1 - 2 sigma + 2 sigma^2))
    torch.testing.assert_close(losses.flow_weights("cosmap", sigma),
                               torch.tensor([2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.25, 0.75)]))


# ---- training --------------------------------------------------------------------------------
def test_demo_datamodule_works_alone():
    dm = DiffusionDataModule(batch_size=4, seed=1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert dm.classes == sorted(["circle", "square", "triangle", "cross", "ring", "bar"])
    assert set(batch["labels"].tolist()) <= set(range(7))  # 6 classes + the null class of guidance


def test_conforms_class_conditional_with_ema(tmp_path):
    report = assert_plugin_conforms("diffusion", tmp_path, [*QUICK, "optim.lr=3e-3"], steps=8)
    assert any("class_embedding" in n for n in report.changed)


def test_text_conditioning_with_caption_dropout(tmp_path):
    report = assert_plugin_conforms("diffusion", tmp_path, [*QUICK, "objective.conditioning.kind=text",
                                                            "objective.conditioning.caption_dropout=0.2", "objective.ema.decay=null",
                                                            "optim.lr=3e-3"], steps=6)
    assert any("attn2" in n for n in report.changed)  # cross-attention to the caption learns


def test_run_samples_resumes_its_ema_and_exports_a_diffusers_pipeline(tmp_path):
    from diffusers import DDPMPipeline

    common = ["plugin=diffusion", *FAST, *QUICK, "objective.conditioning.kind=none", "objective.schedule.prediction_type=v_prediction",
              "objective.loss.snr_gamma=5.0", "objective.ema.decay=0.9", "trainer.val_check_interval=4",
              "trainer.limit_val_batches=2", "checkpoint.every_n_train_steps=4", "callbacks=none",
              f"run_dir={tmp_path / 'run'}"]
    trainer, module, _ = run(compose([*common, "trainer.max_steps=4"]), tmp_path / "run")
    ema = module.objective.ema
    assert int(ema.optimization_step) == 4
    first = ema.shadow_0.clone()
    assert not torch.equal(first, next(module.objective.denoiser.parameters()).detach())
    grid = tmp_path / "run" / "images" / "samples" / "step0000004.png"
    assert grid.exists()
    metrics = series(tmp_path / "run", "val/fid")
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert series(tmp_path / "run", "val/mse_t0.75-1.00")
    # resume: the EMA continues from the checkpoint, not from the weights
    trainer, module, _ = run(compose([*common, "trainer.max_steps=6", "ckpt_path=last"]), tmp_path / "run")
    assert int(module.objective.ema.optimization_step) == 6
    # export: a DDPMPipeline folder that plain diffusers loads and samples from
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "run" / "final"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 32, 32, 3)


def test_class_conditional_export_generates_with_plain_diffusers(tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel

    cfg = compose(["plugin=diffusion", *FAST, *QUICK, "objective.schedule.prediction_type=flow",
                   "objective.schedule.timestep_sampling=logit_normal", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                   "callbacks=none", "objective.evaluation.samples_per_class=0"])
    run(cfg, tmp_path / "run")
    final = tmp_path / "run" / "final"
    labels = json.loads((final / "labels.json").read_text())
    unet = UNet2DModel.from_pretrained(str(final / "unet"))
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(final / "scheduler"))
    scheduler.set_timesteps(2)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    label = torch.tensor([labels.index("circle")])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=label).sample, t, x).prev_sample
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()
    assert DDIMScheduler  # noqa: the DDPM predictions export a DDIM scheduler the same way


# ---- bad input -------------------------------------------------------------------------------
def test_corrupt_image_and_missing_caption_name_the_file(shapes, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "broken.png", "label": "circle", "caption": "a circle"}) + "\n"
                        + json.dumps({"image": str(shapes / "val/circle/00000.png"), "label": "circle"}) + "\n")
    with pytest.raises(DataError, match=r"broken.png: unreadable image"):  # the header pass, before training
        DiffusionDataModule(train=str(manifest), val=str(manifest)).setup()
    dm = DiffusionDataModule(train=str(manifest), val=str(manifest), verify=False)
    dm.setup()
    with pytest.raises(DataError, match=r"broken.png: unreadable image"):  # or when it is met
        dm.train_set[0]
    with pytest.raises(DataError, match=r"m.jsonl, line 2: missing field 'caption'"):
        DiffusionDataModule(train=str(manifest), val=str(manifest), conditioning="text").setup()


def test_bad_model_options_name_the_option(tmp_path):
    from modalforge.plugins.vision.diffusion.model import build_diffusion
    from modalforge.plugins.vision.diffusion.sampling import build_noise_scheduler, build_sampler

    with pytest.raises(ModalforgeError, match=r"data.image_size=30 is not divisible by the VAE's downsampling factor 4"):
        build_diffusion(vae={"block_out_channels": [16, 32, 32]}, image_size=30)
    with pytest.raises(ModalforgeError, match=r"objective.schedule.prediction_type=epsilon is not supported by the pretrained "
                                              r"pipeline's scheduler FlowMatchEulerDiscreteScheduler"):
        build_noise_scheduler("epsilon", pretrained={"_class_name": "FlowMatchEulerDiscreteScheduler"})
    with pytest.raises(ModalforgeError, match=r"objective.evaluation.sampler=ddim does not support objective.schedule.prediction_type=flow"):
        build_sampler("ddim", build_noise_scheduler("flow"), "flow")
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(ModalforgeError, match=r"not_a_pipeline'? is not a diffusers pipeline folder: .*model_index.json"):
        build_diffusion(name_or_path=str(tmp_path / "not_a_pipeline"))
    with pytest.raises(ModalforgeError, match="objective.loss.snr_gamma"):
        from modalforge.plugins.vision.diffusion.objective import DiffusionObjective

        DiffusionObjective(schedule={"prediction_type": "flow"}, loss={"snr_gamma": 5.0})


def test_option_groups_are_checked_by_the_core_signature_check():
    from modalforge.errors import ConfigError
    from modalforge.plugins.vision.diffusion.objective import DiffusionObjective
    from modalforge.plugins.vision.diffusion.options import EMAOptions

    with pytest.raises(ConfigError, match=r"did you mean 'decay'") as err:
        DiffusionObjective(ema={"decy": 0.9})
    assert err.value.where == "objective.ema.decy" and "decay, update_after_step" in err.value.hint
    with pytest.raises(ConfigError, match="one of: epsilon, v_prediction, sample, flow"):
        DiffusionObjective(schedule={"prediction_type": "flo"})
    with pytest.raises(ConfigError, match=r"must be in \(0, 1\)"):
        DiffusionObjective(ema={"decay": 1.5})
    assert DiffusionObjective(ema=EMAOptions(decay=0.9)).ema_options.decay == 0.9
    # from the command line: an added key is refused when the run builds its parts, before any data is read
    from modalforge.run import build_components

    with pytest.raises(ConfigError, match=r"did you mean 'sample_steps'") as err:
        build_components(compose(["plugin=diffusion", "+objective.evaluation.sample_step=2"]))
    assert err.value.where == "objective.evaluation.sample_step" and "samples_per_class" in err.value.hint
