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
                              "model._target_=modalforge.text.models.build_causal_lm")
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
        f"(`hf download {name_or_path} --local-dir /models/x`) and point at the folder: "
        f"model.name_or_path=/models/x. To build a small model from scratch instead, leave model.name_or_path=null."
    )


#: Seconds the one reachability probe of the Hub may take (huggingface_hub's own retries take a minute).
HUB_PROBE_TIMEOUT = 3.0
_reachable: dict[str, bool] = {}


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hub endpoint (``HF_ENDPOINT``) answers at all, any HTTP status; asked once per process,
    through huggingface_hub's own session (its proxies and certificates)."""
    from huggingface_hub import constants, get_session

    endpoint = constants.ENDPOINT
    if endpoint not in _reachable:
        try:
            get_session().head(endpoint, timeout=timeout)
            _reachable[endpoint] = True
        except Exception:  # noqa: BLE001 - DNS, refused, timeout, TLS: all mean "not from here"
            _reachable[endpoint] = False
    return _reachable[endpoint]


def _needs_hub(name_or_path: str) -> bool:
    """A hub id (``org/name``) that is no local folder, not in the local HF cache, with the Hub not declared offline."""
    import os

    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(name_or_path)
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False  # from_pretrained reads the cache alone, and fails at once
    if os.path.exists(os.path.expanduser(text)):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False  # a path that does not exist: from_pretrained names it
    return not os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "models--" + text.replace("/", "--")))


def check_hub(name_or_path: str | None, what: str = "model", where: str | None = "model.name_or_path") -> None:
    """Fail in seconds, in one line, when ``name_or_path`` can only come from a Hub that cannot be reached.

    Without ``HF_HUB_OFFLINE``, ``from_pretrained`` of a hub id retries for a minute or more before it gives up;
    one short probe of the endpoint first tells "no network" apart at once."""
    if not name_or_path or not _needs_hub(str(name_or_path)) or hub_reachable():
        return
    from huggingface_hub import constants

    raise ModelLoadError(
        f"{what} {name_or_path!r} is a Hugging Face Hub id, not in the local cache ({constants.HF_HUB_CACHE}), "
        f"and {constants.ENDPOINT} cannot be reached from this machine",
        where=where,
        hint=f"download it where there is network (`hf download {name_or_path} --local-dir /models/x`) and set "
             f"{where or 'model.name_or_path'}=/models/x{'' if where else ' (data.tokenizer=, if set apart)'}; or, "
             "with it in the HF cache, set HF_HUB_OFFLINE=1")
