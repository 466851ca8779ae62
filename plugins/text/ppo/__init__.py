"""ppo: PPO for language models with a value head, GAE and a per-token KL penalty. Light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="ppo",
    modality="text",
    description="RLHF PPO: policy + value head, GAE, per-token KL to the reference, reward functions or a reward model",
    conf_package="modalforge.plugins.text.ppo.conf",
    datamodule="modalforge.plugins.text.ppo.data.PPODataModule",
    objective="modalforge.plugins.text.ppo.objective.PPOObjective",
)
