"""reward_model data: the same preference pairs as dpo (prompt / chosen / rejected, SHP, ranked lists...).

A ranked record (k responses with scores or ranks) gives every ordered pair by default, as a
reward model learns the whole ranking (dpo takes the best/worst pair)."""

from __future__ import annotations

from typing import Any

from modalforge.text.preference_data import PreferenceDataModule


class RewardModelDataModule(PreferenceDataModule):
    """Preference pairs, chosen then rejected in one batch; see ``PreferenceDataModule`` for the arguments."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs["kind"] = "pairs"
        kwargs.setdefault("ranked_pairs", "all")
        super().__init__(**kwargs)
