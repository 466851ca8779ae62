"""Hydra configs of the clip plugin."""
