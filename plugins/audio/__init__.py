"""Built-in audio plugins."""
