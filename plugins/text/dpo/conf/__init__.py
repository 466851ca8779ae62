"""Hydra configs of the dpo plugin."""
