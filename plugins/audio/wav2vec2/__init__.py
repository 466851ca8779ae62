"""wav2vec2: wav2vec 2.0 self-supervised pretraining: masked contrastive + diversity loss. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="wav2vec2",
    modality="audio",
    description="wav2vec 2.0 self-supervised pretraining: masked contrastive + diversity loss",
    conf_package="modalforge.plugins.audio.wav2vec2.conf",
    datamodule="modalforge.plugins.audio.wav2vec2.data.Wav2Vec2DataModule",
    objective="modalforge.plugins.audio.wav2vec2.objective.Wav2Vec2Objective",
)
