"""Callbacks every run gets: progress bar, throughput, final export."""

__all__ = ["RNGState"]


def __getattr__(name: str):  # lazy: importing the package stays cheap
    if name == "RNGState":
        from modalforge.callbacks.rng_state import RNGState

        return RNGState
    raise AttributeError(name)
