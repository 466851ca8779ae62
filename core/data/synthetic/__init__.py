"""Synthetic, learnable demo datasets generated on first use (no network, no files)."""
