"""whisper_asr: speech recognition: Whisper seq2seq fine-tuning, WER/CER. This `__init__` stays light: Hydra imports it."""

from modalforge.plugin import Plugin

plugin = Plugin(
    name="whisper_asr",
    modality="audio",
    description="speech recognition: Whisper seq2seq fine-tuning, WER/CER",
    conf_package="modalforge.plugins.audio.whisper_asr.conf",
    datamodule="modalforge.plugins.audio.whisper_asr.data.WhisperASRDataModule",
    objective="modalforge.plugins.audio.whisper_asr.objective.WhisperASRObjective",
)
