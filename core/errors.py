"""The error types a user can fix; the CLI prints them as ``error: <where>: <what>`` without a stack trace.

One error shape everywhere (DESIGN.md, "Failing well"): *where* (a config key, a
file and line, a shard and key, a run directory) and *what*, plus at most one
hint line saying how to fix it. ``train`` exits with :data:`USER_ERROR_EXIT`
for these, and with Python's usual 1 for a crash (a bug), so scripts can tell
the two apart. ``MODALFORGE_DEBUG=1`` prints the traceback as well.
"""

from __future__ import annotations

import os

#: Exit code of ``train`` when the user's input was wrong (a crash exits with 1).
USER_ERROR_EXIT = 2


class ModalforgeError(Exception):
    """Base of user-facing errors: the message says what is wrong, ``where`` says where.

    Args:
        message: what is wrong (and what was expected).
        where: the config key, file and line, or folder the user must look at.
        hint: one line on how to fix it, printed under the error.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.where, self.what, self.hint = where, message, hint
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(ModalforgeError):
    """A config value, key or combination that cannot work; ``where`` is the config key."""


class ModelLoadError(ModalforgeError):
    """A model or tokenizer could not be loaded (offline hub, wrong path...)."""


class CheckpointError(ModalforgeError):
    """A checkpoint that cannot be read, or that does not fit the model the config builds."""


class RunDirError(ModalforgeError):
    """A run directory that would be overwritten, or holds nothing to resume."""


def debug_enabled() -> bool:
    """``MODALFORGE_DEBUG=1`` (or ``true``): show tracebacks of user errors too."""
    return os.environ.get("MODALFORGE_DEBUG", "").lower() in ("1", "true", "yes", "on")


def user_error(err: BaseException) -> BaseException | None:
    """The user-facing error inside ``err`` (Hydra wraps constructor errors), if any."""
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ModalforgeError, FileNotFoundError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def format_user_error(err: BaseException) -> list[str]:
    """The lines the CLI prints for a user error: ``error: <where>: <what>`` and at most one hint."""
    text = str(err).strip() or type(err).__name__
    first, _, rest = text.partition("\n")
    hint = getattr(err, "hint", None) or (rest.strip().replace("\n", " ") if rest.strip() else None)
    lines = [f"error: {first}"]
    if hint:
        lines.append(f"hint: {hint}")
    return lines


EXTRAS = {"open_clip": "vision", "torchvision": "vision", "timm": "vision", "PIL": "vision",
          "diffusers": "vision", "torchaudio": "audio", "soundfile": "audio", "deepspeed": "deepspeed",
          "tensorboard": "loggers", "trl": "bench"}


def missing_dependency(err: BaseException) -> str | None:
    """A one-line install hint when ``err`` (or its cause) is a missing optional dependency."""
    current: BaseException | None = err
    seen = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ModuleNotFoundError) and current.name:
            top = current.name.split(".")[0]
            extra = EXTRAS.get(top)
            hint = f'pip install "modalforge[{extra}]"' if extra else f"pip install {top}"
            return f"this plugin needs the package {top!r}, which is not installed: {hint}"
        current = current.__cause__ or current.__context__
    return None


#: gloo's words for a peer that died (its sockets closed) and for a collective that waited past ``strategy.timeout``.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "connection refused", "broken pipe")
_TIMED_OUT = ("timed out",)


def distributed_failure(err: BaseException) -> str | None:
    """What went wrong between ranks when ``err`` (or its cause) is torch.distributed's error about another rank.

    A rank that died breaks its connections; a hung one makes a collective time out.
    """
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)
    dist_error = getattr(dist, "DistError", None)
    seen = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        low = text.lower()
        if (isinstance(dist_error, type) and isinstance(current, dist_error)) or (
                isinstance(current, RuntimeError) and any(m in low for m in _PEER_GONE + _TIMED_OUT)):
            first = text.splitlines()[0] if text else ""
            first = first.split("] ", 1)[-1] if first.startswith("[") else first  # drop gloo's source file
            detail = f"{type(current).__name__}: {first.split('. This is typically', 1)[0][:200]}"
            if any(m in low for m in _TIMED_OUT) or "timeout" in low:
                return f"a collective timed out (strategy.timeout): another rank hung or stopped ({detail})"
            return f"the connection to another rank broke: it died or its node is gone ({detail})"
        current = current.__cause__ or current.__context__
    return None
