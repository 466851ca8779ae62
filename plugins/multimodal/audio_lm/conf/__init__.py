"""Hydra configs of the audio_lm plugin."""
