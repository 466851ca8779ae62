"""grpo data: the core's prompt data (:class:`modalforge.rl.prompts.PromptDataModule`) under grpo's name."""

from __future__ import annotations

from modalforge.rl.prompts import PromptDataModule


class GRPODataModule(PromptDataModule):
    """Prompts plus the fields the rewards read; see :class:`modalforge.rl.prompts.PromptDataModule`."""
