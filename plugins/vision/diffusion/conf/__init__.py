"""Hydra configs of the diffusion plugin."""
