"""A PEFT adapter folder as ``model.name_or_path``: stages that build on each other (sft(LoRA) -> dpo(LoRA)).

An earlier stage trained with ``adapter=lora`` on a pretrained base exports the adapter alone
(``adapter_config.json`` names its base). Pointing the next stage at that folder loads the base,
then the adapter, and either

- merges it into the base, so the next stage trains a new adapter on top of the earlier stage
  (the default; the next stage's ``final/`` is then a whole merged model, since its base exists
  nowhere on disk), or
- continues training that same adapter (``adapter.resume=true``); ``final/`` is again an adapter
  over the original base, which plain ``AutoPeftModelForCausalLM.from_pretrained`` loads.

The loading itself is PEFT's (``PeftModel.from_pretrained``); only the choice is ours.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from modalforge.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
#: attribute set on a ``PeftModel`` whose adapter was loaded to be trained further (``adapter.resume=true``)
CONTINUED = "_modalforge_continued_adapter"


def adapter_folder(name_or_path: str | Path | None) -> Path | None:
    """The local folder of ``name_or_path`` when it holds a PEFT adapter (``adapter_config.json``), else None."""
    if not name_or_path:
        return None
    folder = Path(str(name_or_path)).expanduser()
    return folder if (folder / ADAPTER_CONFIG).is_file() else None


def adapter_base(folder: Path) -> str:
    """The base model an adapter folder was trained on (``base_model_name_or_path`` of its config)."""
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder / ADAPTER_CONFIG} cannot be read: {err}", where="model.name_or_path") from err
    if not base:
        raise ConfigError(f"the adapter in {folder} does not name its base model (base_model_name_or_path is empty)",
                          where="model.name_or_path",
                          hint=f"set base_model_name_or_path in {folder / ADAPTER_CONFIG}, or merge the adapter "
                               "first: modalforge export <run> --merge-lora")
    return str(base)


def config_source(name_or_path: str | Path) -> str:
    """Where the model's ``config.json`` is: the adapter's base for an adapter folder, else ``name_or_path``."""
    folder = adapter_folder(name_or_path)
    return config_source(adapter_base(folder)) if folder is not None else str(name_or_path)


def load_adapter_stage(folder: Path, load_base: Callable[..., nn.Module], *, resume: bool,
                       base_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Base + the adapter in ``folder``: merged (``resume=False``), or a ``PeftModel`` to train further.

    Args:
        folder: the adapter folder (an earlier stage's ``final/``).
        load_base: loads a model from a name or path, with ``base_kwargs`` (the builder itself).
        resume: keep the adapter trainable instead of merging it.
        base_kwargs: the builder's arguments; ``quantization_config`` (QLoRA) is dropped when merging,
            since an adapter cannot be merged into 4-bit weights exactly: the merged model is then
            quantised in memory by ``adapter=qlora``.
    """
    from peft import PeftModel

    kwargs = dict(base_kwargs or {})
    if not resume and kwargs.pop("quantization_config", None) is not None:
        log.warning("model.name_or_path is a LoRA adapter: its base is loaded in full precision to merge it, then "
                    "quantised in memory; to load in 4 bits, merge it once (modalforge export <run> --merge-lora) "
                    "or continue the same adapter (adapter.resume=true)")
    base = load_base(adapter_base(folder), **kwargs)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=resume)
    if resume:
        setattr(model, CONTINUED, str(folder))
        return model
    return model.merge_and_unload()


def continues_adapter(module: nn.Module) -> bool:
    """True for a model whose earlier-stage adapter is trained further (``adapter.resume=true``): under it, the
    adapter-disabled model is the original base, not the earlier stage, so it is no reference policy."""
    return bool(getattr(module, CONTINUED, None))


def export_merged_by_default(model_cfg: Mapping[str, Any] | None, adapter_cfg: Mapping[str, Any] | None) -> bool:
    """Whether ``final/`` is a merged model when ``checkpoint.export_merged`` is unset.

    An adapter alone is useless without its base: a base built from scratch exists nowhere else, nor does a
    base that merged an earlier stage's adapter. A continued adapter (``adapter.resume``) keeps its base.
    """
    name_or_path = (model_cfg or {}).get("name_or_path")
    if not name_or_path:
        return True
    return adapter_folder(name_or_path) is not None and not (adapter_cfg or {}).get("resume", False)
