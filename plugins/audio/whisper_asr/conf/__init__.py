"""Hydra configs of the whisper_asr plugin."""
