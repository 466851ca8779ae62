"""Build a model from its config node: a dotted ``_target_`` builder plus kwargs.

No registry of bare names: ``model._target_`` is the full path of a function (or
class), so a user points a plugin at their own builder without writing a plugin.
Facts known only from the data (``vocab_size``, ``num_classes``) arrive as
*hints* and are passed to the builder only if its signature takes them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from hydra.utils import get_object

from modalforge.errors import ModalforgeError, ModelLoadError


def build_model(model_cfg: Mapping[str, Any], hints: Mapping[str, Any] | None = None) -> Any:
    """Call ``model_cfg['_target_']`` with the other keys, plus the hints it accepts."""
    cfg = dict(model_cfg)
    target = cfg.pop("_target_", None)
    if not target:
        raise ModalforgeError("model._target_ is not set: name the builder function, e.g. "
                              "model._target_=modalforge.plugins.text.causal_lm.model.build_causal_lm")
    builder: Callable[..., Any] = get_object(target)
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in (hints or {}).items():
        if (key in params or takes_any) and cfg.get(key) is None:
            cfg[key] = value
    from modalforge.adapters.loading import pretrained_load_kwargs  # adapter=qlora: the base loads in 4 bits

    for key, value in pretrained_load_kwargs().items():  # only to builders that name the argument
        if key in params and cfg.get(key) is None:
            cfg[key] = value
    return builder(**cfg)


def offline_hint(name_or_path: str, err: BaseException, what: str = "model") -> ModelLoadError:
    """A ``ModelLoadError`` that says the hub may be unreachable and how to use a local copy.

    A local folder that exists but holds no saved model is named as such: advice to
    download it from the hub would send the user the wrong way."""
    import os

    if os.path.isdir(os.path.expanduser(str(name_or_path))):
        files = sorted(os.listdir(os.path.expanduser(str(name_or_path))))[:8]
        return ModelLoadError(
            f"folder {name_or_path!r} holds no loadable {what} ({'empty' if not files else 'files: ' + ', '.join(files)}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            where="model.name_or_path", hint="point at a folder written by save_pretrained (a run's final/ is one)")
    return ModelLoadError(
        f"could not load {what} {name_or_path!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"If this machine has no access to the Hugging Face Hub, download the {what} elsewhere "
        f"(`huggingface-cli download {name_or_path} --local-dir /models/x`) and point at the folder: "
        f"model.name_or_path=/models/x. To build a small model from scratch instead, leave model.name_or_path=null."
    )
