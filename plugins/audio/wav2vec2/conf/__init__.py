"""Hydra configs of the wav2vec2 plugin."""
