"""reward_model: Bradley-Terry reward model: causal LM with a scalar head on preference pairs. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="reward_model",
    modality="text",
    description="Bradley-Terry reward model: causal LM with a scalar head on preference pairs",
    conf_package="modalforge.plugins.text.reward_model.conf",
    datamodule="modalforge.plugins.text.reward_model.data.RewardModelDataModule",
    objective="modalforge.plugins.text.reward_model.objective.RewardModelObjective",
)
