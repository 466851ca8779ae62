"""What an adapter asks of a pretrained model's loading (``adapter=qlora``: load the base in 4 bits).

The core builds models through the config's builder (:func:`modalforge.models.build_model`),
so an adapter cannot reach ``from_pretrained`` itself. Instead the LightningModule enters
:func:`pretrained_loading` around the Objective's ``configure_model``; for its duration
:func:`pretrained_load_kwargs` returns what the adapter asked for (``quantization_config``),
and ``build_model`` passes each of those to any builder that takes an argument of that name.
A builder that does not take one (a model built from a config, an image model) is built as
before, and the adapter then works in memory (``quantize_linears``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

_LOAD_KWARGS: ContextVar[dict[str, Any] | None] = ContextVar("modalforge_pretrained_load_kwargs", default=None)


def adapter_load_kwargs(adapter: Any, precision: str | int | None = None) -> dict[str, Any]:
    """``adapter.load_kwargs(precision)`` if the adapter defines it (``QLoraAdapter`` does), else ``{}``."""
    hook = getattr(adapter, "load_kwargs", None)
    return dict(hook(precision)) if callable(hook) else {}


@contextmanager
def pretrained_loading(adapter: Any, precision: str | int | None = None) -> Iterator[dict[str, Any]]:
    """Make ``adapter``'s ``from_pretrained`` arguments visible to the model builders called inside."""
    token = _LOAD_KWARGS.set(adapter_load_kwargs(adapter, precision))
    try:
        yield dict(_LOAD_KWARGS.get() or {})
    finally:
        _LOAD_KWARGS.reset(token)


def pretrained_load_kwargs() -> dict[str, Any]:
    """The ``from_pretrained`` arguments the active adapter asked for (empty outside :func:`pretrained_loading`)."""
    return dict(_LOAD_KWARGS.get() or {})
