"""grpo's ``trl_config=``: a TRL ``GRPOConfig`` file, read through the shared mapping in ``modalforge.cli.trl_config``.

GRPOConfig's own arguments (``num_generations``, ``beta``, ``epsilon``, ``loss_type``...) share the
Objective's parameter names and map onto ``objective.<name>`` by themselves, so no handler is needed.
"""

from __future__ import annotations

from modalforge.cli.trl_config import TrlPlugin

mapping = TrlPlugin(config_classes=("GRPOConfig",), pretrained_model="grpo/pretrained")
