"""Hydra configs of the causal_lm plugin (on the search path via its entry point)."""
