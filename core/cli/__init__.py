"""Command-line entry points: ``train`` (Hydra) and ``modalforge`` (utilities).

``train`` discovers plugins *before* Hydra composes, so that ``plugin=<name>``
resolves for built-in and pip-installed plugins alike, and so that an unknown
name gets a list of the installed ones instead of a config-not-found trace.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from modalforge import registry
from modalforge.overrides import override_key

USAGE = """usage: train plugin=<name> [key=value ...]      (Hydra overrides; `train plugin=<name> --cfg job` prints the config)

examples:
  train plugin=<name>                                     offline demo: tiny model, data generated on first use
  train plugin=<name> adapter=lora trainer.max_steps=50
  train plugin=<name> model.name_or_path=/models/my-model data.train='/data/*.jsonl'
  train -m plugin=<name> optim.lr=1e-3,3e-4               sweep
"""

_HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc")


def _plugin_names(argv: Sequence[str]) -> list[str] | None:
    for arg in argv:
        if arg.startswith("plugin="):
            return [n for n in arg.split("=", 1)[1].split(",") if n]
    return None


def _fail(message: str, code: int | None = None, hint: str | None = None) -> None:
    from modalforge.errors import USER_ERROR_EXIT

    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT if code is None else code)


def _report_user_error(err: BaseException) -> None:
    """Print a user error as its last lines (``error: <where>: <what>`` + one hint) and exit."""
    import traceback

    from modalforge.errors import USER_ERROR_EXIT, debug_enabled, format_user_error

    if debug_enabled():
        traceback.print_exception(err)
    sys.stdout.flush()
    print("\n".join(format_user_error(err)), file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT)


def _task(cfg) -> None:  # noqa: ANN001 - DictConfig, imported lazily
    from hydra.core.hydra_config import HydraConfig

    from modalforge.errors import distributed_failure, missing_dependency, user_error
    from modalforge.run import run
    from modalforge.scale import launch
    from modalforge.scale.ranks import close_process_group

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    launch.watch_children()  # a dead child process: this process reports it rather than being SIGKILLed silently
    try:
        trainer, _, _ = run(cfg, HydraConfig.get().runtime.output_dir)
        if not trainer.interrupted:  # an interrupted rank's peers may be gone: no barrier with them
            close_process_group()  # before interpreter exit, which can abort a finished gloo run
    except SIGTERMException:  # a SystemExit: a preempted job, checkpointed by CheckpointOnInterrupt
        sys.stdout.flush()
        if launch.is_rank_zero():
            print("[modalforge] stopped by SIGTERM after a checkpoint; the same command plus ckpt_path=last resumes",
                  file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT) from None
    except Exception as err:  # noqa: BLE001 - user errors print one line; bugs keep their trace
        known = user_error(err)
        if known is not None:
            _report_user_error(known)
        failure = distributed_failure(err)
        if failure is not None:
            _report_rank_failure(err, failure)
        hint = missing_dependency(err)
        if hint is None:
            raise
        _fail(hint)


def _report_rank_failure(err: BaseException, what: str) -> None:
    """A multi-process run lost a rank (dead, hung, unreachable): one ``error:`` line, the others stopped, exit 2."""
    import torch.distributed as dist

    from modalforge.errors import ModalforgeError
    from modalforge.scale import launch

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else launch.process_rank()
    child = launch.child_failure(wait_s=2.0)  # under Lightning's launcher: which child died, and how
    launch.stop_children()  # a hung child would outlive the run
    failure = ModalforgeError(f"{child + '; ' if child else ''}{what}", where=f"rank {rank}",
                              hint="the same command plus ckpt_path=last continues from the last saved checkpoint")
    failure.__cause__ = err  # MODALFORGE_DEBUG=1 shows the original trace
    _report_user_error(failure)


#: ``train`` stopped by SIGTERM (a preempted job) exits 128 + 15, as a shell reports it.
SIGTERM_EXIT = 143


def _is_multirun(argv: Sequence[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


def preset_lr_warning(cfg: Any, overrides: Sequence[str]) -> str | None:
    """A real model from ``model=preset/<family>`` at the plugin's default ``optim.lr``, which is set for its
    tiny demo model (a preset cannot set it: the plugin's config is composed after the model group)."""
    chosen = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=preset/")), None)
    model = cfg.get("model") or {}
    if chosen is None or not model.get("name_or_path") or any(override_key(o) == "optim.lr" for o in overrides):
        return None
    lr = (cfg.get("optim") or {}).get("lr")
    return (f"model={chosen} trains {model.get('name_or_path')} at the plugin's default optim.lr={lr}, which is "
            f"meant for its tiny demo model; set optim.lr (the preset's file suggests a value per paradigm and "
            f"adapter, e.g. 1e-4..2e-4 with LoRA, 1e-5..2e-5 in full for supervised fine-tuning)")


def _precheck(argv: list[str]) -> list[str]:
    """Compose and validate before Hydra starts a job; returns extra overrides for the job.

    Catching mistakes here means Hydra never creates or writes into the run directory
    for a config that cannot run, and a finished run's ``.hydra/`` is never rewritten:
    a later attempt in the same ``run_dir`` writes its own ``.hydra/attempt_N/``.
    """
    from pathlib import Path

    from modalforge.config import compose
    from modalforge.rundir import attempt_subdir, check_run_dir
    from modalforge.scale import launch
    from modalforge.validate import validate_config

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        cfg = compose(overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's composition errors, turned into one line
        raise _composition_error(err, overrides) from None
    validate_config(cfg)
    warning = preset_lr_warning(cfg, overrides)
    if warning and launch.is_rank_zero():
        print(f"warning: {warning}", file=sys.stderr)
    extra = []
    launcher = launch.detect()
    if launcher is not None:  # torchrun / srun: trainer.num_nodes and devices follow it; one run_dir for all ranks
        extra += launch.fit_trainer(cfg, overrides, launcher)
        agreed = launch.agree_run_dir(cfg, launcher)
        if agreed is not None:
            extra.append(f"run_dir={launch.override_value(agreed)}")
            cfg.run_dir = agreed
    if any(override_key(o) in ("hydra.run.dir", "hydra.output_subdir") for o in overrides):
        return extra
    try:
        run_dir = Path(str(cfg.run_dir))
    except Exception:  # noqa: BLE001 - an interpolation only a running job resolves
        return extra
    check_run_dir(run_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False)))
    subdir = attempt_subdir(run_dir)
    if subdir is not None and not bool(cfg.get("overwrite", False)) and launch.is_rank_zero():
        print(f"[modalforge] {run_dir} was used before: this attempt's config goes to {run_dir / subdir}")
        return [*extra, f"hydra.output_subdir={subdir}"]
    return extra


def _composition_error(err: BaseException, overrides: list[str]) -> BaseException:
    """A ``ConfigError`` naming the override that Hydra could not apply, with close valid keys."""
    import difflib

    from modalforge.errors import ConfigError

    options = getattr(err, "options", None)
    missing = getattr(err, "missing_cfg_file", None)
    if missing and options is not None:
        group, _, name = str(missing).rpartition("/")
        close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
        return ConfigError(f"no option '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
                           where=group or missing, hint=f"options of {group}: {', '.join(options)}")
    messages = []
    current: BaseException | None = err
    while current is not None and len(messages) < 4:
        messages.append(str(current).splitlines()[0] if str(current) else type(current).__name__)
        current = current.__cause__ or current.__context__
    text = " ".join(messages)
    for override in overrides:
        key = override_key(override)
        if f"'{key}'" in text or f"full_key: {key}" in str(err.__cause__ or ""):
            parent, _, leaf = key.rpartition(".")
            valid = _valid_keys(parent, [o for o in overrides if o != override])
            close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
            if "not in" in text or "not found" in text.lower():
                hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else (
                    f"valid keys of {parent or 'the root'}: {', '.join(valid)}" if valid else None)
                return ConfigError("unknown key", where=key, hint=hint)
            return ConfigError(messages[-1], where=key)
    return ConfigError(": ".join(dict.fromkeys(messages)))


def _valid_keys(parent: str, overrides: list[str]) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    from modalforge.config import compose

    try:
        node = OmegaConf.select(compose(overrides), parent) if parent else compose(overrides)
    except Exception:  # noqa: BLE001
        return []
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def _expand_trl_config(argv: list[str]) -> list[str]:
    """``trl_config=<file>``: a TRL DPOConfig/SFTConfig/GRPOConfig file as Hydra overrides, before Hydra composes."""
    if not any(a.startswith("trl_config=") for a in argv):
        return argv
    from modalforge.errors import ModalforgeError
    from modalforge.cli.trl_config import expand_argv

    try:
        return expand_argv(argv)
    except ModalforgeError as err:
        _report_user_error(err)
        raise  # unreachable: _report_user_error exits


def train(argv: Sequence[str] | None = None) -> None:
    """The ``train`` console script."""
    from modalforge.cli.lightning_args import translate_argv  # LightningCLI-style --trainer.max_steps=... forms
    from modalforge.errors import ConfigError

    try:
        argv = translate_argv(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        _report_user_error(err)
    argv = _expand_trl_config(argv)
    try:
        from modalforge import config

        config.register()
        names = _plugin_names(argv)
        asks_help = any(a in ("--help", "-h") for a in argv)
        if names is None and (asks_help or not any(a in _HYDRA_INFO_FLAGS for a in argv)):
            # without a plugin, Hydra's own help would fail composing the config (plugin is required)
            print(USAGE + "\ninstalled plugins:\n" + registry.describe())
            raise SystemExit(0 if not argv or asks_help else 2)
        for name in names or []:
            registry.get(name)
    except registry.PluginError as err:
        _fail(str(err))

    if not _is_multirun(argv) and not any(a in _HYDRA_INFO_FLAGS or a.startswith("--cfg") or a == "-c"
                                          for a in argv):
        from modalforge.errors import ModalforgeError

        try:
            argv += _precheck(argv)
        except ModalforgeError as err:
            _report_user_error(err)

    from modalforge.scale.launch import rank_hydra_overrides

    argv += rank_hydra_overrides(argv)  # ranks other than zero write no .hydra/ and no cli.log
    import hydra

    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path="pkg://modalforge.conf", config_name="train", version_base="1.3")(_task)()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``modalforge`` console script: ``modalforge plugins``, ``modalforge version``."""
    parser = argparse.ArgumentParser(prog="modalforge", description="modalforge utilities (training is `train`).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list installed plugins with modality, package and description")
    sub.add_parser("version", help="print the modalforge version")
    compare = sub.add_parser("compare", help="table and plots of several runs, or of a sweep (train -m)")
    compare.add_argument("runs", nargs="+", help="run directories and/or a multirun (sweep) directory")
    compare.add_argument("--out", default=None, help="report folder (default: <first run dir>/compare)")
    from modalforge.cli import evaluate, export, generate, pipeline, preprocess

    pipeline.add_arguments(sub.add_parser("pipeline", help="run train stages in order, each from the last's outputs"))
    export.add_arguments(sub.add_parser("export", help="write any checkpoint of a run in the final/ layout "
                                                       "(HF / PEFT / open_clip)"))
    evaluate.add_arguments(sub.add_parser("eval", help="a run's validation metrics on any data, without training"))
    generate.add_arguments(sub.add_parser("generate", help="sample from a text or vision-language final/ folder"))
    preprocess.add_arguments(sub.add_parser("preprocess", help="tokenise a train run's data into the token cache "
                                                               "ahead of time (same overrides as train)"))
    args = parser.parse_args(argv)
    if args.command in ("eval", "generate", "preprocess"):
        from modalforge.errors import ModalforgeError

        try:
            {"eval": evaluate, "generate": generate, "preprocess": preprocess}[args.command].main(args)
        except ModalforgeError as err:
            _report_user_error(err)
    if args.command == "export":
        from modalforge.errors import ModalforgeError

        try:
            export.main(args)
        except ModalforgeError as err:
            _report_user_error(err)
    if args.command == "pipeline":
        pipeline.main(args)
    if args.command == "version":
        from modalforge import __version__

        print(__version__)
    elif args.command == "compare":
        from modalforge.compare import compare as compare_runs
        from modalforge.errors import ModalforgeError

        try:
            compare_runs(args.runs, out=args.out)
        except ModalforgeError as err:
            _report_user_error(err)
    elif args.command == "plugins":
        try:
            print(registry.describe())
        except registry.PluginError as err:
            _fail(str(err))


if __name__ == "__main__":  # pragma: no cover
    main()
