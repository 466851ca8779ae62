"""``modalforge eval <final/> --lm-eval tasks=...``: EleutherAI's lm-evaluation-harness on a model folder.

The folder is a run's ``final/`` (a run directory stands for its ``final/``) or any Hugging Face causal-LM
folder: full weights (``config.json``) load as they are, a PEFT adapter alone (``adapter_config.json``)
loads on its base, ``base_model_name_or_path`` in that file (lm_eval's ``HFLM(pretrained=base, peft=folder)``;
the tokenizer is the folder's when it holds one). Tasks are lm_eval's own or YAML files under
``--include-path`` (a local task over a local file needs no hub).

What is written, to ``--out`` (default ``<run_dir>/eval/lm_eval/``, or ``<folder>_lm_eval/`` beside a folder
that is in no run):

- ``lm_eval.json``: lm_eval's results (``results``, ``n-samples``, ``n-shot``, ``versions``, ``configs``,
  ``config`` ...) without the per-document samples, plus ``modalforge``: what was evaluated and how.
- ``csv/metrics.csv`` (one row at the step ``final/`` was exported at, metrics named
  ``val/lm_eval/<task>/<metric>``), ``.hydra/config.yaml`` and ``finished.json``: the shape of a run,
  so ``modalforge compare <out> <other out> ...`` puts scores side by side.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from modalforge.errors import ConfigError, ModalforgeError, RunDirError

#: lm_eval's result entries that are labels, not metrics.
_NOT_METRICS = {"alias", "name", "sample_len", " ", "samples"}


@dataclass
class LMEvalSource:
    """The folder lm_eval loads, the base model under a PEFT adapter, and the run it came from (if any)."""

    folder: Path
    base: str | None = None
    run_dir: Path | None = None

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


def _is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def resolve(source: str | Path) -> LMEvalSource:
    """A model folder (``final/``), or a run directory's ``final/``; a ``RunDirError`` otherwise."""
    path = Path(source).expanduser()
    if not path.exists():
        raise RunDirError("does not exist", where=str(path), hint="give a run directory or its final/ folder")
    run_dir = None
    if path.is_dir() and not _is_model(path) and (path / "final").is_dir():
        run_dir, path = path, path / "final"
    if not _is_model(path):
        hint = (f"write one from a checkpoint with `modalforge export {run_dir or path.parent}`"
                if path.is_file() or run_dir is not None or _is_run_dir(path) else
                "give a run's final/ folder, a run directory holding one, or a Hugging Face model folder")
        raise RunDirError("holds no Hugging Face model (config.json) or PEFT adapter (adapter_config.json) for "
                          "lm_eval", where=str(path), hint=hint)
    if run_dir is None and _is_run_dir(path.parent):
        run_dir = path.parent
    base = None
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file() and not (path / "config.json").is_file():
        base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError("names no base model (base_model_name_or_path)", where=str(adapter_config),
                              hint="set it to the folder or hub name of the model the adapter was trained on")
    return LMEvalSource(folder=path, base=base, run_dir=run_dir)


def _is_model(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file())


def parse_tasks(value: str) -> list[str]:
    """``tasks=a,b`` (or ``a,b``) -> ``["a", "b"]``."""
    text = value.strip()
    key, sep, rest = text.partition("=")
    if sep:
        if key.strip() != "tasks":
            raise ConfigError(f"unknown setting {key.strip()!r}", where="--lm-eval",
                              hint="--lm-eval tasks=<task>[,<task>...]; the other settings are flags: "
                                   "--num-fewshot, --limit, --batch-size, --include-path, --device, --out")
        text = rest
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("names no task", where="--lm-eval", hint="--lm-eval tasks=hellaswag,arc_easy")
    return tasks


def _number(value: str | None, flag: str) -> int | float | None:
    if value is None:
        return None
    try:
        number = float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise ConfigError(f"{value!r} is not a number", where=flag) from None
    if number <= 0:
        raise ConfigError(f"{value!r} must be > 0", where=flag)
    return number


def _batch_size(value: str | None) -> int | str:
    if value is None:
        return 1
    if value == "auto" or value.startswith("auto:"):
        return value
    number = _number(value, "--batch-size")
    if not isinstance(number, int):
        raise ConfigError(f"{value!r} is not a whole number or auto", where="--batch-size")
    return number


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - its dependencies (transformers, peft...)
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ModuleNotFoundError as err:
        raise ModalforgeError(f"--lm-eval needs EleutherAI's lm-evaluation-harness (the package "
                              f"{err.name or 'lm_eval'!r}), which is not installed: "
                              f'pip install "modalforge[eval]"') from None
    return lm_eval


def _check_tasks(task_manager: Any, tasks: Sequence[str], include_path: Sequence[str]) -> None:
    """Unknown task names as one ``ConfigError`` with the closest known ones (lm_eval only logs them)."""
    import difflib

    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).exists()]
    if not unknown:
        return
    close = {t: difflib.get_close_matches(t, sorted(known), n=1, cutoff=0.6) for t in unknown}
    named = ", ".join(f"{t!r}" + (f" (did you mean {close[t][0]!r}?)" if close[t] else "") for t in unknown)
    where = "--lm-eval tasks"
    hint = (f"task YAMLs are read from {', '.join(include_path)} and lm_eval's own tasks"
            if include_path else "a local task YAML needs --include-path <its folder>; "
                                 "`lm_eval ls tasks` lists lm_eval's own")
    raise ConfigError(f"no task {named}", where=where, hint=hint)


def default_out(source: LMEvalSource) -> Path:
    if source.run_dir is not None:
        return source.run_dir / "eval" / "lm_eval"
    return source.folder.with_name(f"{source.folder.name}_lm_eval")


def run_lm_eval(source: str | Path, tasks: Sequence[str], *, num_fewshot: int | None = None,
                limit: int | float | None = None, batch_size: int | str = 1, include_path: Sequence[str] = (),
                device: str | None = None, out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Run lm_eval's ``simple_evaluate`` on ``source``; returns (out dir, what ``lm_eval.json`` holds)."""
    found = resolve(source)
    for folder in include_path:
        if not Path(folder).is_dir():
            raise ConfigError("is not a folder", where=f"--include-path {folder}",
                              hint="the folder that holds the task YAML files")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    task_manager = TaskManager(include_path=[str(p) for p in include_path] or None)
    _check_tasks(task_manager, tasks, include_path)
    if found.is_adapter:
        has_tokenizer = (found.folder / "tokenizer_config.json").is_file()
        model = HFLM(pretrained=str(found.base), peft=str(found.folder), device=device, batch_size=batch_size,
                     tokenizer=str(found.folder) if has_tokenizer else None)
    else:
        model = HFLM(pretrained=str(found.folder), device=device, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager, log_samples=False)
    if results is None:  # a non-zero rank of a multi-process run
        return Path(out or default_out(found)), {}
    report = {k: v for k, v in dict(results).items() if k != "samples"}
    report["modalforge"] = {
        "source": str(source), "model": str(found.folder), "base_model": found.base, "run_dir":
        str(found.run_dir) if found.run_dir else None, "tasks": list(tasks), "num_fewshot": num_fewshot,
        "limit": limit, "batch_size": batch_size, "device": device, "include_path": [str(p) for p in include_path],
    }
    directory = Path(out).expanduser() if out else default_out(found)
    _write(directory, report, found)
    return directory, report


def rows(report: dict[str, Any]) -> list[tuple[str, str, float, float | None, int | None]]:
    """(task, metric, value, stderr, docs) for each metric of each task or group, in lm_eval's order."""
    table = []
    samples = report.get("n-samples") or {}
    for task, entries in (report.get("results") or {}).items():
        docs = (samples.get(task) or {}).get("effective")
        for key, value in entries.items():
            metric, _, filt = key.partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = entries.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
            name = metric if filt in ("", "none") else f"{metric}[{filt}]"
            table.append((task, name, float(value), float(stderr) if isinstance(stderr, (int, float)) else None,
                          int(docs) if docs is not None else None))
    return table


def format_table(report: dict[str, Any]) -> str:
    """The results as a table: task, metric, value, stderr, docs."""
    def number(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    header = ("task", "metric", "value", "stderr", "docs")
    body = [(t, m, number(v), number(s), "-" if n is None else str(n)) for t, m, v, s, n in rows(report)]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value, key=str)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return str(value)


def _write(directory: Path, report: dict[str, Any], found: LMEvalSource) -> None:
    """``lm_eval.json``, and the files ``modalforge compare`` reads of a run."""
    import csv

    from omegaconf import OmegaConf

    from modalforge.callbacks.export import exported_step
    from modalforge.rundir import mark_finished

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lm_eval.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    settings = report["modalforge"]
    hydra_dir = directory / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    config: Any = OmegaConf.create({})
    run_config = found.run_dir / ".hydra" / "config.yaml" if found.run_dir else None
    if run_config is not None and run_config.is_file():
        config = OmegaConf.load(run_config)  # the plugin and model, as compare shows them
    config = OmegaConf.merge(config, {"lm_eval": {k: settings[k] for k in
                                                  ("model", "base_model", "tasks", "num_fewshot", "limit")}})
    OmegaConf.save(config, hydra_dir / "config.yaml")
    overrides = [f"lm_eval.tasks={','.join(settings['tasks'])}"]
    overrides += [f"lm_eval.{k}={settings[k]}" for k in ("num_fewshot", "limit") if settings[k] is not None]
    (hydra_dir / "overrides.yaml").write_text("".join(f"- {json.dumps(o)}\n" for o in overrides))
    step = exported_step(found.folder) or 0
    metrics = {f"val/lm_eval/{task}/{metric}": value for task, metric, value, _, _ in rows(report)}
    (directory / "csv").mkdir(exist_ok=True)
    with (directory / "csv" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *metrics])
        writer.writerow([step, *metrics.values()])
    mark_finished(directory, step)


def main(args: Any) -> None:
    """``modalforge eval <folder> --lm-eval tasks=...`` (arguments from ``evaluate.add_arguments``)."""
    if args.overrides:
        raise ConfigError(f"overrides ({' '.join(args.overrides)}) change a run's config for its validation; "
                          f"lm_eval takes no run config", where="--lm-eval",
                          hint="lm_eval's settings are flags: --num-fewshot, --limit, --batch-size, --include-path")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tasks = parse_tasks(args.lm_eval)
    num_fewshot = None
    if args.num_fewshot is not None:
        if not args.num_fewshot.isdigit():
            raise ConfigError(f"{args.num_fewshot!r} is not a whole number >= 0", where="--num-fewshot")
        num_fewshot = int(args.num_fewshot)
    directory, report = run_lm_eval(
        args.source, tasks, num_fewshot=num_fewshot, limit=_number(args.limit, "--limit"),
        batch_size=_batch_size(args.batch_size), include_path=args.include_path or (), device=args.device,
        out=args.out)
    if report:
        print(format_table(report))
        print(f"[modalforge] lm_eval results written to {directory / 'lm_eval.json'} (modalforge compare {directory})")
