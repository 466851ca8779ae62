"""Hydra configs of the image_classification plugin."""
