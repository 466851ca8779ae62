"""reward_model data: the same preference pairs as dpo (prompt / chosen / rejected)."""

from __future__ import annotations

from typing import Any

from modalforge.plugins.text.dpo.data import DPODataModule


class RewardModelDataModule(DPODataModule):
    """Preference pairs, chosen then rejected in one batch; see ``DPODataModule`` for the arguments."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["kind"] = "pairs"
        super().__init__(**kwargs)
