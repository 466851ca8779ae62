"""vlm: LLaVA-style vision tower + projector + language model on interleaved image-text data. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="vlm",
    modality="multimodal",
    description="LLaVA-style vision-language model (tower + projector + LM) on interleaved image-text data",
    conf_package="modalforge.plugins.multimodal.vlm.conf",
    datamodule="modalforge.plugins.multimodal.vlm.data.VLMDataModule",
    objective="modalforge.plugins.multimodal.vlm.objective.VLMObjective",
)
