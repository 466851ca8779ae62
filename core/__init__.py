"""modalforge: train models of every modality through one plugin interface.

This top-level module stays import-light on purpose: Hydra imports the
``__init__`` of every package on its config search path, and ``modalforge
plugins`` must list plugins without importing torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
