"""multitask: several plugins' objectives in one run on one optimiser, with modules shared by name. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="multitask",
    modality="multimodal",
    description="several plugins' objectives in one run (tasks=[clip,causal_lm]), one optimiser, shared modules",
    conf_package="modalforge.plugins.multimodal.multitask.conf",
    datamodule="modalforge.plugins.multimodal.multitask.data.MultiTaskDataModule",
    objective="modalforge.plugins.multimodal.multitask.objective.MultiTaskObjective",
)
