"""Pipelines: named ``train`` stages run in order, a later stage wired to an earlier one's outputs.

``modalforge pipeline <file.yaml or shipped name> [--dir DIR] [--dry-run] [overrides...]``.
A pipeline file is plain YAML::

    name: causal_lm_sft_dpo            # optional; default: the file name
    overrides: [trainer.precision=32-true]   # optional; applied to every stage
    stages:
      - name: pretrain                 # a run directory <pipeline dir>/pretrain/
        plugin: causal_lm
        overrides: [trainer.max_steps=200]
      - name: sft
        plugin: sft
        overrides: [model=sft/pretrained, "model.name_or_path=${stages.pretrain.final}"]

Each stage is an ordinary ``train`` run in a process of its own (so one stage's
memory, CUDA context or crash never leaks into the next) with
``run_dir=<pipeline dir>/<stage name>``. Overrides may refer to an earlier stage's
outputs: ``${stages.<name>.run_dir}``, ``${stages.<name>.final}`` (the exported
model) and ``${stages.<name>.checkpoints}``; these are resolved here with
OmegaConf against a ``stages`` node, and any other ``${...}`` is left for Hydra.

Rerunning the same command continues the pipeline: a finished stage (its run
directory holds ``finished.json`` or ``final/``) is skipped, never rerun over; an
interrupted one (checkpoints, not finished) is resumed with ``ckpt_path=last``;
the others start afresh. Before any stage runs, every reference is checked (the
stage exists, comes earlier and will produce that output) and every stage's
config is composed and validated, so a typo in the last stage costs seconds, not
the first stage's hours. A stage that fails stops the pipeline, which exits with
the stage's own exit code; a mistake in the pipeline file exits with 2.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from modalforge.errors import ConfigError, ModalforgeError
from modalforge.overrides import override_key

#: What ``${stages.<name>.<output>}`` may name.
OUTPUTS = ("run_dir", "final", "checkpoints")
#: Keys a pipeline file and a stage may have.
PIPELINE_KEYS = ("name", "description", "overrides", "stages")
STAGE_KEYS = ("name", "plugin", "overrides")
#: Overrides the pipeline owns: where a stage runs and whether it resumes.
RESERVED = ("run_dir", "ckpt_path", "overwrite", "plugin", "hydra.run.dir", "hydra.sweep.dir", "hydra.output_subdir")
DEFAULT_ROOT = Path("outputs") / "pipeline"

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REFERENCE = re.compile(r"\$\{\s*stages\.([^.}\s]*)(?:\.([^}\s]*))?\s*\}")
# A `${` that does not open a stages reference: escaped, so OmegaConf leaves it to Hydra.
_OTHER_INTERPOLATION = re.compile(r"\$\{(?!\s*stages\.)")
# Runs `train` with this interpreter, whether or not its console script is on PATH.
_TRAIN = "import sys; sys.argv[0] = 'train'; from modalforge.cli import train; train()"


class StageFailed(Exception):
    """A stage's ``train`` process exited with an error (or stopped before finishing)."""

    def __init__(self, stage: str, code: int, message: str) -> None:
        self.stage, self.code = stage, code
        super().__init__(message)


@dataclass
class Stage:
    """One ``train`` run of a pipeline, as written in the file (overrides unresolved)."""

    name: str
    plugin: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Pipeline:
    """A loaded pipeline file: its stages and the overrides applied to every stage."""

    name: str
    stages: list[Stage]
    overrides: list[str]
    source: Path


@dataclass
class StagePlan:
    """What a stage will do in this invocation, with its resolved ``train`` arguments."""

    stage: Stage
    run_dir: Path
    status: Literal["finished", "resume", "fresh"]
    args: list[str]
    #: (stage referred to, output, where) for each ``${stages...}`` in this stage's overrides
    needs: list[tuple[str, str, str]]

    def command(self) -> str:
        return shlex.join(["train", *self.args])


# ---- loading --------------------------------------------------------------------------------
def shipped_pipelines() -> dict[str, Path]:
    """Pipelines shipped in ``modalforge.conf/pipeline``, by name."""
    from modalforge.config import conf_root

    folder = conf_root() / "pipeline"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_pipeline(name_or_path: str) -> Path:
    """A pipeline file: an existing path, else a shipped pipeline of that name."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_pipelines()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError("is neither a pipeline file nor a shipped pipeline", where=name_or_path,
                      hint=f"shipped pipelines: {', '.join(shipped) or 'none'}; or give the path of a YAML file")


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise ConfigError(f"must be a list of overrides (key=value strings), got {value!r}", where=where)
    return [str(v) for v in value]


def _check_override(override: str, where: str) -> None:
    if override.startswith("-"):
        raise ConfigError(f"{override!r}: flags are not stage overrides", where=where,
                          hint="give key=value overrides; `modalforge pipeline ... --dry-run` prints the commands")
    key = override_key(override)
    if "=" not in override and not override.startswith("~"):
        raise ConfigError(f"{override!r} is not key=value", where=where)
    if key in RESERVED:
        what = "the stage's `plugin:`" if key == "plugin" else "the pipeline"
        raise ConfigError(f"{key} is set by {what}: each stage runs in <pipeline dir>/<stage name>, is resumed "
                          "when interrupted and never overwritten", where=where,
                          hint="choose the pipeline's directory with --dir; a finished stage is kept as it is")


def load_pipeline(path: str | Path, extra_overrides: Sequence[str] = ()) -> Pipeline:
    """Read and check a pipeline file (schema, names, overrides); ``extra_overrides`` apply to every stage."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"not valid YAML: {getattr(err, 'problem', None) or err}", where=where) from None
    except OSError as err:
        raise ConfigError(f"cannot read: {err.strerror or err}", where=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("a pipeline file is a mapping with a `stages:` list", where=str(path))
    for key in data:
        if key not in PIPELINE_KEYS:
            raise ConfigError(f"unknown key '{key}' in {path.name}", where=str(key),
                              hint=f"a pipeline file has: {', '.join(PIPELINE_KEYS)}")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"needs a non-empty list of stages in {path.name}", where="stages")
    stages: list[Stage] = []
    for i, raw in enumerate(raw_stages):
        if not isinstance(raw, dict):
            raise ConfigError(f"a stage is a mapping with name, plugin and overrides, got {raw!r}", where=f"stages[{i}]")
        name = raw.get("name")
        where = f"stages.{name}" if isinstance(name, str) and name else f"stages[{i}]"
        for key in raw:
            if key not in STAGE_KEYS:
                raise ConfigError(f"unknown key '{key}'", where=f"{where}.{key}",
                                  hint=f"a stage has: {', '.join(STAGE_KEYS)}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"stage name {name!r} must be a word (letters, digits, _): it names the stage's "
                              "folder and its ${stages.<name>...} references", where=f"stages[{i}].name")
        if name in (s.name for s in stages):
            raise ConfigError(f"two stages are named '{name}'", where=f"stages[{i}].name")
        plugin = raw.get("plugin")
        if not isinstance(plugin, str) or not plugin:
            raise ConfigError("is required: the plugin this stage trains with (`train plugin=<name>`)",
                              where=f"{where}.plugin")
        overrides = _string_list(raw.get("overrides"), f"{where}.overrides")
        for j, override in enumerate(overrides):
            _check_override(override, f"{where}.overrides[{j}]")
        stages.append(Stage(name, plugin, overrides))
    common = _string_list(data.get("overrides"), "overrides")
    for j, override in enumerate(common):
        _check_override(override, f"overrides[{j}]")
    extra = list(extra_overrides)
    for override in extra:
        _check_override(override, "command line")
    name = data.get("name") or path.stem
    return Pipeline(str(name), stages, common + extra, path)


# ---- planning -------------------------------------------------------------------------------
def stage_outputs(run_dir: Path) -> dict[str, str]:
    """What ``${stages.<name>.<output>}`` resolves to for a stage running in ``run_dir``."""
    return {"run_dir": str(run_dir), "final": str(run_dir / "final"), "checkpoints": str(run_dir / "checkpoints")}


def _merge(overrides: Sequence[str]) -> list[str]:
    """Later overrides of a key replace earlier ones (so every-stage overrides win), order kept."""
    out: dict[str, str] = {}
    for override in overrides:
        key = override_key(override)
        out.pop(key, None)
        out[key] = override
    return list(out.values())


def _exports_final(stage: Stage, common: Sequence[str]) -> bool:
    for override in _merge([*stage.overrides, *common]):
        key, _, value = override.partition("=")
        if key.lstrip("+") == "checkpoint.export_on_end" and value.strip().lower() in ("false", "0", "no", "off"):
            return False
    return True


def _resolve(override: str, where: str, stage: Stage, earlier: dict[str, dict[str, str]],
             names: list[str]) -> tuple[str, list[tuple[str, str, str]]]:
    """``override`` with its ``${stages...}`` references resolved, and the (stage, output) pairs it needs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    refs = _REFERENCE.findall(override)
    if not refs:
        return override, []
    needs = []
    for ref_stage, output in refs:
        if ref_stage not in names:
            raise ConfigError(f"refers to stage '{ref_stage}', which does not exist", where=where,
                              hint=f"stages: {', '.join(names)}")
        if ref_stage not in earlier:
            when = "itself" if ref_stage == stage.name else f"stage '{ref_stage}', which runs later"
            raise ConfigError(f"refers to {when}: a stage can use only the outputs of stages before it", where=where,
                              hint=f"stages before '{stage.name}': {', '.join(earlier) or 'none'}")
        if output not in OUTPUTS:
            raise ConfigError(f"${{stages.{ref_stage}.{output}}}: a stage's outputs are {', '.join(OUTPUTS)}",
                              where=where)
        needs.append((ref_stage, output, where))
    escaped = _OTHER_INTERPOLATION.sub(r"\\${", override)
    try:
        value = OmegaConf.create({"stages": earlier, "value": escaped}).value
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve {override!r}: {str(err).splitlines()[0]}", where=where) from None
    return str(value), needs


def plan(pipeline: Pipeline, pipeline_dir: str | Path) -> list[StagePlan]:
    """Each stage's status, resolved ``train`` arguments and needs; raises ``ConfigError`` for a bad reference."""
    from modalforge.rundir import has_checkpoints, is_finished

    pipeline_dir = Path(pipeline_dir).expanduser().absolute()
    names = [s.name for s in pipeline.stages]
    earlier: dict[str, dict[str, str]] = {}
    plans: list[StagePlan] = []
    for stage in pipeline.stages:
        run_dir = pipeline_dir / stage.name
        status: Literal["finished", "resume", "fresh"] = (
            "finished" if is_finished(run_dir) else "resume" if has_checkpoints(run_dir) else "fresh")
        resolved, needs = [], []
        for j, override in enumerate(stage.overrides):
            value, wanted = _resolve(override, f"stages.{stage.name}.overrides[{j}]", stage, earlier, names)
            resolved.append(value)
            needs += wanted
        args = [f"plugin={stage.plugin}", *_merge([*resolved, *pipeline.overrides]), f"run_dir={run_dir}"]
        if status == "resume":
            args.append("ckpt_path=last")
        plans.append(StagePlan(stage, run_dir, status, args, needs))
        earlier[stage.name] = stage_outputs(run_dir)
    by_name = {p.stage.name: p for p in plans}
    for p in plans:
        for ref_stage, output, where in p.needs:
            _check_will_exist(by_name[ref_stage], output, where, pipeline.overrides, before_run=True)
    return plans


def _check_will_exist(source: StagePlan, output: str, where: str, common: Sequence[str], before_run: bool) -> None:
    """A referenced output that exists, or (before running) that its stage will produce."""
    path = Path(stage_outputs(source.run_dir)[output])
    if output == "run_dir" or path.exists():
        return
    name = source.stage.name
    if before_run and source.status != "finished":
        if output == "final" and not _exports_final(source.stage, common):
            raise ConfigError(f"uses ${{stages.{name}.final}}, but stage '{name}' sets checkpoint.export_on_end=false "
                              "and will write no final/", where=where,
                              hint=f"drop checkpoint.export_on_end=false from stage '{name}', or refer to "
                                   f"${{stages.{name}.checkpoints}}")
        return
    state = "finished" if source.status == "finished" or not before_run else "ran"
    raise ConfigError(f"uses ${{stages.{name}.{output}}}, but stage '{name}' {state} without producing {path}",
                      where=where, hint=f"look into {source.run_dir}; to rerun that stage, move its folder away")


def check_configs(plans: Sequence[StagePlan]) -> None:
    """Compose and validate every stage that will run, before any runs (a finished stage is not rerun)."""
    from modalforge import registry
    from modalforge.config import compose
    from modalforge.validate import validate_config

    for p in plans:
        if p.status == "finished":
            continue
        where = f"stages.{p.stage.name}"
        try:
            registry.get(p.stage.plugin)
        except registry.PluginError as err:
            raise ConfigError(str(err).splitlines()[0], where=f"{where}.plugin") from None
        try:
            try:
                cfg = compose(p.args)
            except Exception as err:  # noqa: BLE001 - Hydra's composition errors, as train reports them
                from modalforge.cli import _composition_error

                raise _composition_error(err, p.args) from None
            validate_config(cfg)
        except ModalforgeError as err:
            raise ConfigError(f"{err.where + ': ' if err.where else ''}{err.what}",
                              where=_override_where(p.stage, err.where), hint=err.hint) from None


def _override_where(stage: Stage, key: str | None) -> str:
    """``stages.<name>.overrides[i]`` for the override that sets ``key`` (or a parent of it), else the stage."""
    if key:
        for j, override in enumerate(stage.overrides):
            set_key = override_key(override)
            if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
                return f"stages.{stage.name}.overrides[{j}]"
    return f"stages.{stage.name}"


# ---- running --------------------------------------------------------------------------------
def _recorded_overrides(run_dir: Path) -> list[str] | None:
    """The overrides of the newest attempt recorded by Hydra in ``run_dir``."""
    import yaml

    hydra_dir = run_dir / ".hydra"
    attempts = sorted(hydra_dir.glob("attempt_*/overrides.yaml"), key=lambda p: int(p.parent.name.split("_")[1]))
    newest = attempts[-1] if attempts else hydra_dir / "overrides.yaml"
    try:
        return [str(o) for o in yaml.safe_load(newest.read_text()) or []]
    except (OSError, yaml.YAMLError, TypeError):
        return None


def _changed_since(p: StagePlan) -> tuple[list[str], list[str]]:
    """Overrides a finished stage ran with and would not get now, and the reverse."""
    ignore = ("run_dir", "ckpt_path", "hydra.output_subdir")
    recorded = _recorded_overrides(p.run_dir)
    if recorded is None:
        return [], []
    then = [o for o in recorded if override_key(o) not in ignore]
    now = [o for o in p.args if override_key(o) not in ignore]
    return [o for o in then if o not in now], [o for o in now if o not in then]


def _run_stage(p: StagePlan) -> int:
    """Run one stage's ``train`` and wait for it, passing a SIGTERM (a preempted job) on to it.

    Ctrl-C reaches the stage directly (same process group); a SIGTERM sent to the pipeline
    alone is forwarded, so the stage writes its checkpoint and exits instead of running on orphaned.
    """
    import signal
    import threading

    proc = subprocess.Popen([sys.executable, "-c", _TRAIN, *p.args])
    forward = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum)) if forward else None
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue  # the stage got the same Ctrl-C: let it write its checkpoint and exit
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


def run_pipeline(pipeline: Pipeline, pipeline_dir: str | Path, *, dry_run: bool = False,
                 validate: bool = True) -> list[StagePlan]:
    """Run (or, with ``dry_run``, print) the stages in order; returns the plans.

    Raises:
        ConfigError: a mistake in the pipeline file, found before any stage runs.
        StageFailed: a stage's ``train`` exited with an error; later stages did not run.
    """
    pipeline_dir = Path(pipeline_dir).expanduser().absolute()
    plans = plan(pipeline, pipeline_dir)
    if validate:
        check_configs(plans)
    total = len(plans)
    print(f"[pipeline] {pipeline.name}: {total} stages in {pipeline_dir}" + (" (dry run)" if dry_run else ""))
    for i, p in enumerate(plans, 1):
        head = f"[pipeline] stage {i}/{total} '{p.stage.name}'"
        if p.status == "finished":
            print(f"{head}: finished earlier in {p.run_dir}, skipped")
            then, now = _changed_since(p)
            if then or now:
                print(f"[pipeline]   note: it ran with other overrides (then: {' '.join(then) or '-'}; now: "
                      f"{' '.join(now) or '-'}); its outputs are kept as they are: move its folder away to rerun it")
            continue
        print(f"{head}: {'resumes from its last checkpoint' if p.status == 'resume' else 'runs'}\n  {p.command()}",
              flush=True)
        if dry_run:
            continue
        for ref_stage, output, where in p.needs:
            _check_will_exist(next(q for q in plans if q.stage.name == ref_stage), output, where,
                              pipeline.overrides, before_run=False)
        code = _run_stage(p)
        if code != 0:
            code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
            raise StageFailed(p.stage.name, code,
                              f"train exited with code {code} (its output is above; run directory {p.run_dir})")
        from modalforge.rundir import is_finished

        if not is_finished(p.run_dir):
            raise StageFailed(p.stage.name, 130, f"stopped before finishing (no finished.json in {p.run_dir}); "
                                                 "the same command resumes it")
        p.status = "finished"
    if not dry_run:
        print(f"[pipeline] {pipeline.name}: all {total} stages finished in {pipeline_dir}")
    return plans


# ---- command line ---------------------------------------------------------------------------
def _arguments(parser: argparse.ArgumentParser, *, rest: bool) -> None:
    if rest:  # the subcommand's parser keeps all but leading options for the intermixed parse below
        parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="FILE [OVERRIDE ...]",
                            help="a pipeline YAML file, or the name of a shipped one (causal_lm_sft_dpo, "
                                 "clip_image_classification), then Hydra overrides applied to every stage")
    else:
        parser.add_argument("file")
        parser.add_argument("overrides", nargs="*")
    parser.add_argument("--dir", default=None,
                        help="the pipeline's directory; each stage runs in DIR/<stage>; default outputs/pipeline/<name>")
    parser.add_argument("--dry-run", action="store_true", help="check everything and print the train commands")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``modalforge pipeline``: options may come before or after the file and overrides."""
    _arguments(parser, rest=True)


def parse_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """File, overrides, ``--dir`` and ``--dry-run`` in any order (argparse's subcommands cannot intermix)."""
    inner = argparse.ArgumentParser(prog="modalforge pipeline")
    _arguments(inner, rest=False)
    parsed = inner.parse_intermixed_args(list(args.rest))
    parsed.dir = parsed.dir or args.dir
    parsed.dry_run = parsed.dry_run or args.dry_run
    return parsed


def main(args: Any) -> None:
    """``modalforge pipeline``: exits 2 for a mistake in the pipeline, a failed stage's code otherwise."""
    from modalforge.errors import USER_ERROR_EXIT, debug_enabled, format_user_error

    args = parse_arguments(args)
    try:
        pipeline = load_pipeline(find_pipeline(args.file), args.overrides)
        directory = Path(args.dir) if args.dir else DEFAULT_ROOT / pipeline.name
        run_pipeline(pipeline, directory, dry_run=args.dry_run)
    except ModalforgeError as err:
        if debug_enabled():
            import traceback

            traceback.print_exception(err)
        sys.stdout.flush()
        print("\n".join(format_user_error(err)), file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    except StageFailed as err:
        sys.stdout.flush()
        print(f"error: stages.{err.stage}: {err}", file=sys.stderr)
        print("hint: fix the cause and rerun the same command: finished stages are skipped, an interrupted one "
              "resumes", file=sys.stderr)
        raise SystemExit(err.code) from None
