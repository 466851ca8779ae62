"""clip: CLIP contrastive image-text training with open_clip, retrieval and zero-shot eval. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="clip",
    modality="vision",
    description="CLIP contrastive image-text training with open_clip, retrieval and zero-shot eval",
    conf_package="modalforge.plugins.vision.clip.conf",
    datamodule="modalforge.plugins.vision.clip.data.CLIPDataModule",
    objective="modalforge.plugins.vision.clip.objective.CLIPObjective",
)
