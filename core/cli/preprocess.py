"""``modalforge preprocess <train overrides>``: fill the token cache ahead of time, as ``axolotl preprocess``.

It composes and validates the same config as ``train`` with the same overrides, then builds only
the plugin's DataModule and sets it up: records are read and checked, the tokenizer is loaded or
trained, and the tokenised examples are written to the token cache
(:mod:`modalforge.text.token_cache`, ``data.token_cache``). No model is built and nothing trains;
the ``train`` run with the same overrides then reads the cache. Useful before a multi-GPU run (one
process tokenises, and no rank waits at a barrier while it does) or on a CPU machine beside the
GPU one, with a shared ``data.cache_dir`` / ``data.token_cache`` folder.
"""

from __future__ import annotations

import time
from typing import Any, Sequence


def preprocess(overrides: Sequence[str]) -> list[dict[str, Any]]:
    """Set up the DataModule of ``train <overrides>``; one dict per split/source: what, entry, hit, examples."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from modalforge import config, registry
    from modalforge.batch_size import SEARCH_KEYS, datamodule_config, is_auto
    from modalforge.cli import _composition_error
    from modalforge.errors import ConfigError
    from modalforge.validate import validate_config

    overrides = [o for o in overrides if not o.startswith("-")]
    if not any(o.split("=", 1)[0] == "plugin" for o in overrides):
        raise ConfigError("no plugin given", where="plugin",
                          hint="modalforge preprocess plugin=<name> [the train overrides]")
    config.register()
    try:
        cfg = config.compose(list(overrides))
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors, as train reports them
        raise _composition_error(err, list(overrides)) from None
    validate_config(cfg)
    registry.get(cfg.plugin.name)
    data = cfg.data
    if is_auto(data.get("batch_size")) or any(key in data for key in SEARCH_KEYS):
        data = datamodule_config(OmegaConf.to_container(data, resolve=True), 1)
    datamodule = instantiate(data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    entries = getattr(datamodule, "token_cache_entries", None) or {}
    return [{"what": what, "entry": entry, "hit": hit, "examples": count}
            for what, (entry, hit, count) in entries.items()]


def main(args: Any) -> None:
    """``modalforge preprocess`` (arguments from :func:`add_arguments`)."""
    start = time.perf_counter()
    found = preprocess(args.overrides)
    seconds = time.perf_counter() - start
    if not found:
        print(f"[modalforge] preprocess: the data was read and checked in {seconds:.1f} s; this plugin's "
              "DataModule keeps no token cache, so train prepares it again")
        return
    for row in found:
        if row["entry"] is None:
            print(f"[modalforge] preprocess: {row['what']}: {row['examples']} examples tokenised, not kept "
                  "(data.token_cache=off)")
        else:
            state = "already in" if row["hit"] else "written to"
            print(f"[modalforge] preprocess: {row['what']}: {row['examples']} examples {state} the token cache "
                  f"{row['entry']}")
    print(f"[modalforge] preprocess: done in {seconds:.1f} s; `train` with the same overrides reads the cache")


def add_arguments(parser: Any) -> None:
    parser.add_argument("overrides", nargs="*", help="the train overrides (plugin=<name> key=value ...)")
