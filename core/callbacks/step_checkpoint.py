"""Lightning's ``ModelCheckpoint`` with its ``state_key`` computed once.

Lightning labels every callback hook call for its profiler with the callback's ``state_key``,
even with no profiler; ``ModelCheckpoint`` builds that key from a repr of its settings (about
7 µs), and a training step calls about ten hooks: a fixed cost per step that buys nothing, since
the settings do not change after ``__init__``. The key is the one ``ModelCheckpoint`` gives, so
checkpoints written with either class restore the callback's state in the other.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``state_key`` is cached (same value as ``ModelCheckpoint``'s)."""

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_cached_state_key")
        if key is None:
            key = super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
            self._cached_state_key = key
        return key
