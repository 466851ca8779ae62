"""Hydra configs of the multitask plugin."""
