"""image_classification: image classification: torchvision/timm/HF models, CE + accuracy. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="image_classification",
    modality="vision",
    description="image classification: torchvision/timm/HF models, CE + accuracy",
    conf_package="modalforge.plugins.vision.image_classification.conf",
    datamodule="modalforge.plugins.vision.image_classification.data.ImageClassificationDataModule",
    objective="modalforge.plugins.vision.image_classification.objective.ImageClassificationObjective",
)
