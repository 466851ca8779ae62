"""Hydra configs of the sft plugin."""
