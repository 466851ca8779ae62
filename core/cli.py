"""Command-line entry points: ``train`` (Hydra) and ``modalforge`` (utilities).

``train`` discovers plugins *before* Hydra composes, so that ``plugin=<name>``
resolves for built-in and pip-installed plugins alike, and so that an unknown
name gets a list of the installed ones instead of a config-not-found trace.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from modalforge import registry

USAGE = """usage: train plugin=<name> [key=value ...]      (Hydra overrides; `train plugin=<name> --cfg job` prints the config)

examples:
  train plugin=causal_lm                                  offline demo: tiny model, synthetic corpus
  train plugin=causal_lm adapter=lora trainer.max_steps=50
  train plugin=causal_lm model.name_or_path=/models/my-llama data.train='/data/*.jsonl'
  train -m plugin=causal_lm optim.lr=1e-3,3e-4             sweep
"""

_HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc")


def _plugin_names(argv: Sequence[str]) -> list[str] | None:
    for arg in argv:
        if arg.startswith("plugin="):
            return [n for n in arg.split("=", 1)[1].split(",") if n]
    return None


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _task(cfg) -> None:  # noqa: ANN001 - DictConfig, imported lazily
    from hydra.core.hydra_config import HydraConfig

    from modalforge.errors import missing_dependency, user_error
    from modalforge.run import run

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except Exception as err:  # noqa: BLE001 - user errors print one line; bugs keep their trace
        known = user_error(err)
        if known is not None:
            _fail(str(known))
        hint = missing_dependency(err)
        if hint is None:
            raise
        _fail(hint)


def train(argv: Sequence[str] | None = None) -> None:
    """The ``train`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from modalforge import config

        config.register()
        names = _plugin_names(argv)
        if names is None and not any(a in _HYDRA_INFO_FLAGS for a in argv):
            print(USAGE + "\ninstalled plugins:\n" + registry.describe())
            raise SystemExit(0 if not argv else 2)
        for name in names or []:
            registry.get(name)
    except registry.PluginError as err:
        _fail(str(err))

    import hydra

    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path="pkg://modalforge.conf", config_name="train", version_base="1.3")(_task)()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``modalforge`` console script: ``modalforge plugins``, ``modalforge version``."""
    parser = argparse.ArgumentParser(prog="modalforge", description="modalforge utilities (training is `train`).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list installed plugins with modality, package and description")
    sub.add_parser("version", help="print the modalforge version")
    args = parser.parse_args(argv)
    if args.command == "version":
        from modalforge import __version__

        print(__version__)
    elif args.command == "plugins":
        try:
            print(registry.describe())
        except registry.PluginError as err:
            _fail(str(err))


if __name__ == "__main__":  # pragma: no cover
    main()
