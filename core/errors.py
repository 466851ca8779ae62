"""The error types a user can fix; the CLI prints their message without a stack trace."""

from __future__ import annotations


class ModalforgeError(Exception):
    """Base of user-facing errors: the message says what is wrong and how to fix it."""


class ModelLoadError(ModalforgeError):
    """A model or tokenizer could not be loaded (offline hub, wrong path...)."""


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


EXTRAS = {"open_clip": "vision", "torchvision": "vision", "timm": "vision", "PIL": "vision",
          "torchaudio": "audio", "soundfile": "audio", "deepspeed": "deepspeed", "tensorboard": "loggers"}


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
