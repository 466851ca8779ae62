"""Built-in multimodal plugins."""
