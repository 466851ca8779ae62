"""dpo data: the core's preference data (pairs, or KTO's unpaired labelled completions) under dpo's name."""

from __future__ import annotations

from modalforge.text.preference_data import PreferenceDataModule


class DPODataModule(PreferenceDataModule):
    """Preference pairs or KTO completions; see :class:`modalforge.text.preference_data.PreferenceDataModule`."""
