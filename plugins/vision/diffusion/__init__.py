"""diffusion: image generation on diffusers (UNet/DiT denoisers, DDPM/flow objectives, EMA, sample grids).

This `__init__` stays light: Hydra imports it.
"""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="diffusion",
    modality="vision",
    description="image generation on diffusers: eps / v / x0 / flow objectives, class or text conditioning, EMA",
    conf_package="modalforge.plugins.vision.diffusion.conf",
    datamodule="modalforge.plugins.vision.diffusion.data.DiffusionDataModule",
    objective="modalforge.plugins.vision.diffusion.objective.DiffusionObjective",
)
