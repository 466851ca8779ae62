"""Hydra configs of the vlm plugin."""
