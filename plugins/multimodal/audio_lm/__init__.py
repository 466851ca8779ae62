"""audio_lm: an audio-language model (audio encoder + projector + causal LM) answering questions about clips.

This ``__init__`` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="audio_lm",
    modality="multimodal",
    description="audio-language model (Qwen2-Audio: audio encoder + projector + causal LM) on audio QA / transcripts",
    conf_package="modalforge.plugins.multimodal.audio_lm.conf",
    datamodule="modalforge.plugins.multimodal.audio_lm.data.AudioLMDataModule",
    objective="modalforge.plugins.multimodal.audio_lm.objective.AudioLMObjective",
)
