"""Images/s of `train plugin=diffusion` against a plain loop written as diffusers' train_text_to_image.py.

Both train the same UNet (the plugin's default, built by the same builder) with the same
DDPMScheduler, batch, AdamW, gradient clipping and EMA (diffusers' EMAModel), alternately in
one process; the median of the paired ratios is printed. ``--latents`` also times the latent
model (``model=diffusion/latent``) with cached latents against encoding with the VAE every step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from _common import compare, framework_rate
from modalforge.config import compose
from modalforge.models import build_model
from modalforge.optim import build_optimizer

# train_text_to_image.py's objective: epsilon on a DDPM schedule, uniform timesteps (the demo default is flow)
COMMON = ["objective.evaluation.samples_per_class=0", "optim.warmup_steps=0", "optim.scheduler=constant",
          "objective.schedule.prediction_type=epsilon", "objective.schedule.timestep_sampling=uniform"]


def diffusers_loop(steps: int, seed: int, batch_size: int) -> float:
    """train_text_to_image.py's inner loop, on the plugin's class-conditional pixel UNet."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    cfg = compose(["plugin=diffusion", f"data.batch_size={batch_size}", *COMMON])
    L.seed_everything(seed, verbose=False)
    dm = instantiate(cfg.data)
    dm.setup()
    unet = build_model(dict(cfg.model), {**dm.model_hints(), "conditioning": "class"}).denoiser
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="epsilon", clip_sample=False)
    optimizer = build_optimizer(unet.named_parameters(), dict(cfg.optim))
    ema_unet = EMAModel(unet.parameters(), decay=float(cfg.objective.ema.decay), foreach=True)
    unet.train()
    done, start = 0, None
    while done < steps:
        for batch in dm.train_dataloader():
            if start is None:
                start = time.perf_counter()
            latents = batch["pixel_values"]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            model_pred = unet(noisy, timesteps, class_labels=batch["labels"]).sample
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_unet.step(unet.parameters())
            done += 1
            if done == steps:
                break
    return (steps - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latents", action="store_true", help="also time cached latents against VAE encoding")
    args = parser.parse_args()
    compare("diffusion", lambda i: diffusers_loop(args.steps, i, args.batch_size),
            lambda i: framework_rate(["plugin=diffusion", f"seed={i}", f"trainer.max_steps={args.steps}",
                                      f"data.batch_size={args.batch_size}", *COMMON]),
            args.repeats, unit="images/s", scale=args.batch_size, target=0.97)
    if args.latents:
        rates: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.repeats):
            for cached in (False, True):
                rates[cached].append(args.batch_size * framework_rate(
                    ["plugin=diffusion", "model=diffusion/latent", f"seed={i}", f"trainer.max_steps={args.steps}",
                     f"data.batch_size={args.batch_size}", f"data.cache_latents={str(cached).lower()}", *COMMON]))
        speedup = statistics.median(c / e for c, e in zip(rates[True], rates[False]))
        print(f"\nlatent model, VAE encode every step: {statistics.median(rates[False]):8.2f} images/s")
        print(f"latent model, cached latents       : {statistics.median(rates[True]):8.2f} images/s")
        print(f"speed-up of cached latents: {speedup:.2f}x (median of paired repeats)")


if __name__ == "__main__":
    main()
