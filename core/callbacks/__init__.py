"""Callbacks every run gets: progress bar, throughput, final export."""
