"""Configuration shipped as package data: the root `train.yaml` and core groups."""
