"""Hydra configs of the sine plugin."""
