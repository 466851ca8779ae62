"""grpo: group-relative policy optimisation (GRPO, DAPO, Dr. GRPO, BNPO, RLOO, GSPO, CISPO, SAPO, LUSPO, VESPO).

This `__init__` stays light: Hydra imports it.
"""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="grpo",
    modality="text",
    description="RL with verifiable rewards: GRPO and its variants (DAPO, Dr. GRPO, RLOO, GSPO...) on Python rewards",
    conf_package="modalforge.plugins.text.grpo.conf",
    datamodule="modalforge.plugins.text.grpo.data.GRPODataModule",
    objective="modalforge.plugins.text.grpo.objective.GRPOObjective",
    trl="modalforge.plugins.text.grpo.trl:mapping",
)
