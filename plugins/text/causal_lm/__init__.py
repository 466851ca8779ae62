"""causal_lm: next-token pretraining / continued pretraining of a causal LM on raw text.

Run it: ``train plugin=causal_lm`` (offline demo: tiny Llama-style model, synthetic
corpus generated on first use). Real use: ``model.name_or_path=<hub id or dir>
data.train='/data/*.jsonl'``. This ``__init__`` stays light: Hydra imports it.
"""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="causal_lm",
    modality="text",
    description="next-token pretraining of a causal LM on raw text (txt, jsonl, parquet, shards)",
    conf_package="modalforge.plugins.text.causal_lm.conf",
    datamodule="modalforge.plugins.text.causal_lm.data.CausalLMDataModule",
    objective="modalforge.plugins.text.causal_lm.objective.CausalLMObjective",
)
