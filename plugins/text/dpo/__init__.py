"""dpo: preference optimisation: DPO, IPO, hinge, robust, SimPO, ORPO, KTO. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="dpo",
    modality="text",
    description="preference optimisation: DPO, IPO, hinge, robust, SimPO, ORPO, KTO",
    conf_package="modalforge.plugins.text.dpo.conf",
    datamodule="modalforge.plugins.text.dpo.data.DPODataModule",
    objective="modalforge.plugins.text.dpo.objective.DPOObjective",
    trl="modalforge.plugins.text.dpo.trl:mapping",
)
