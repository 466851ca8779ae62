"""sft: supervised fine-tuning on chats/instructions, loss on assistant tokens, packing. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="sft",
    modality="text",
    description="supervised fine-tuning on chats/instructions, loss on assistant tokens, packing",
    conf_package="modalforge.plugins.text.sft.conf",
    datamodule="modalforge.plugins.text.sft.data.SFTDataModule",
    objective="modalforge.plugins.text.sft.objective.SFTObjective",
    trl="modalforge.plugins.text.sft.trl:mapping",
)
