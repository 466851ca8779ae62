"""``modalforge compare``: one table and one folder of plots for several runs, or a whole sweep.

Everything is read from what a run already leaves in its directory, so runs of any
plugin, finished or not, compare without re-running anything:

- ``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` (the latest ``.hydra/attempt_N/`` if the run
  was resumed): the plugin and the overrides. The table shows the overrides that differ between
  runs; those common to all runs are printed once above it.
- ``csv/metrics.csv`` and ``csv/resumed_N/metrics.csv``: the curves (a resumed part continues them).
- ``finished.json`` (written when training ended): the step count. Wall time runs from the job's
  start (``.hydra/config.yaml`` written) to ``finished.json`` (or the last metrics written, for an
  unfinished run, whose steps are marked ``*``); a resumed run's includes the pause between attempts.
- ``final/confusion_matrix.csv`` (``image_classification``) and ``images/<name>/step*.png``
  (plugins whose Objective makes images, e.g. ``diffusion``): copied and plotted.

Best of a metric is its minimum for loss-like names (loss, ppl, wer, cer, mse, fid...) and its
maximum for accuracy-like ones (acc, recall, precision, f1, bleu, reward...); a name that is
neither (a temperature, a scale) gets no "best".

A sweep (``train -m ...``) writes the same report into ``<sweep dir>/compare/`` at its end through
:class:`CompareOnMultirunEnd`, a Hydra callback registered in ``conf/train.yaml``.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from hydra.experimental.callback import Callback

from modalforge.errors import RunDirError
from modalforge.overrides import override_key

#: Overrides that say where a run went, not what it did: never "key overrides".
_NOT_KEY = re.compile(r"^(run_dir|ckpt_path|overwrite|plugin|hydra\..*)$")
_OVERRIDES_WIDTH = 80
_SKIP_DIRS = {"compare", "checkpoints", "final", "csv", "images", ".hydra", "wandb", "mlruns"}
_NEUTRAL = {"std", "temperature", "scale", "lr", "chance", "seen", "count", "logit"}
_HIGHER = ("acc", "recall", "precision", "f1", "auc", "bleu", "rouge", "top", "iou", "dice", "reward", "margin",
           "map", "win", "match")
_LOWER = ("loss", "ppl", "perplexity", "wer", "cer", "error", "err", "mse", "mae", "rmse", "fid", "kid", "nll", "kl",
          "bpb", "bpc")
#: Whole names whose words mislead: wav2vec2's codevector perplexity measures codebook use (higher is better).
_EXACT = {"codevector_perplexity": "max"}


def direction(metric: str) -> Literal["min", "max"] | None:
    """``min`` for loss-like metrics, ``max`` for accuracy-like ones, ``None`` when neither."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    if leaf in _EXACT:
        return _EXACT[leaf]  # type: ignore[return-value]
    words = [w for w in re.split(r"[^a-z0-9]+", leaf) if w]
    if any(w in _NEUTRAL for w in words):
        return None
    if any(w.startswith(h) for w in words for h in _HIGHER):
        return "max"
    if any(w.startswith(lo) for w in words for lo in _LOWER):
        return "min"
    return None


@dataclass
class RunInfo:
    """What one run directory says about itself."""

    path: Path
    label: str
    plugin: str
    overrides: list[str]
    steps: int | None
    finished: bool
    wall_s: float | None
    curves: dict[str, dict[int, float]] = field(default_factory=dict)
    confusion: Path | None = None
    images: dict[str, Path] = field(default_factory=dict)

    def final(self, metric: str) -> float | None:
        points = self.curves.get(metric)
        return points[max(points)] if points else None

    def best(self, metric: str) -> float | None:
        points, how = self.curves.get(metric), direction(metric)
        if not points or how is None:
            return None
        return min(points.values()) if how == "min" else max(points.values())


def find_runs(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Run directories (those with ``.hydra/config.yaml``) in or under ``paths``, with a label each.

    Raises:
        RunDirError: a path that does not exist or holds no run.
    """
    found: list[tuple[Path, str]] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise RunDirError("does not exist" if not given.exists() else "is not a directory", where=str(given),
                              hint="modalforge compare <run dir> [<run dir> ...] or <a multirun sweep dir>")
        if (given / ".hydra" / "config.yaml").is_file():
            found.append((given, given.name))
            continue
        below = sorted(_runs_below(given, depth=3), key=lambda p: _natural(p.relative_to(given)))
        if not below:
            raise RunDirError("holds no run (no .hydra/config.yaml in it or below it)", where=str(given),
                              hint="give a run directory (outputs/<plugin>/<date>) or a sweep's (multirun/...)")
        found += [(p, str(p.relative_to(given))) for p in below]
    labels = [label for _, label in found]
    if len(set(labels)) < len(labels):  # the same sub-folder names in two sweeps: use the whole path
        found = [(p, str(p)) for p, _ in found]
    return found


def _runs_below(folder: Path, depth: int) -> list[Path]:
    if depth == 0:
        return []
    runs = []
    for child in folder.iterdir():
        if not child.is_dir() or child.name in _SKIP_DIRS:
            continue
        if (child / ".hydra" / "config.yaml").is_file():
            runs.append(child)
        else:
            runs += _runs_below(child, depth - 1)
    return runs


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def load_run(path: Path, label: str) -> RunInfo:
    """Read one run directory (see the module docstring for what is read)."""
    import yaml

    hydra_dir = _latest_attempt(path / ".hydra")
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text()) or {}
    overrides_file = hydra_dir / "overrides.yaml"
    overrides = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])] if overrides_file.exists() else []
    plugin = str((config.get("plugin") or {}).get("name", "?"))
    curves = read_curves(path)
    marker = path / "finished.json"
    finished = marker.is_file()
    steps = None
    if finished:
        steps = int(json.loads(marker.read_text()).get("step", 0))
    else:
        logged = [s for points in curves.values() for s in points]
        steps = max(logged) + 1 if logged else None
    start = (path / ".hydra" / "config.yaml").stat().st_mtime
    ends = [marker] if finished else [p for p in _metrics_files(path)]
    end = max((p.stat().st_mtime for p in ends if p.exists()), default=None)
    confusion = path / "final" / "confusion_matrix.csv"
    images = {}
    for folder in sorted((path / "images").glob("*")) if (path / "images").is_dir() else []:
        pngs = sorted(folder.glob("step*.png"))
        if pngs:
            images[folder.name] = pngs[-1]
    return RunInfo(path=path, label=label, plugin=plugin, overrides=overrides, steps=steps, finished=finished,
                   wall_s=(end - start) if end is not None else None, curves=curves,
                   confusion=confusion if confusion.is_file() else None, images=images)


def _latest_attempt(hydra_dir: Path) -> Path:
    attempts = [p for p in hydra_dir.glob("attempt_*") if (p / "config.yaml").is_file()]
    return max(attempts, key=_natural) if attempts else hydra_dir


def _metrics_files(path: Path) -> list[Path]:
    folder = path / "csv"
    return [folder / "metrics.csv"] + sorted(folder.glob("resumed_*/metrics.csv"), key=_natural)


def read_curves(path: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value} from ``csv/metrics.csv`` and its resumed parts (a later value wins)."""
    curves: dict[str, dict[int, float]] = {}
    for file in _metrics_files(path):
        if not file.is_file():
            continue
        with file.open(newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    step = int(float(row.get("step") or ""))
                except ValueError:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or key is None or value in (None, ""):
                        continue
                    try:
                        curves.setdefault(key, {})[step] = float(value)
                    except ValueError:
                        pass
    return curves


def split_overrides(runs: Sequence[RunInfo]) -> tuple[list[str], dict[str, list[str]]]:
    """Overrides common to all runs, and per run (by label) those that differ."""
    def key(o: str) -> str:
        return override_key(o)

    cleaned = {r.label: [o for o in r.overrides if not _NOT_KEY.match(key(o))] for r in runs}
    if len(runs) == 1:
        return [], cleaned
    canonical = {label: {_canonical(o) for o in c} for label, c in cleaned.items()}
    common = [o for o in cleaned[runs[0].label] if all(_canonical(o) in c for c in canonical.values())]
    shared = {_canonical(o) for o in common}
    return common, {label: [o for o in c if _canonical(o) not in shared] for label, c in cleaned.items()}


def _canonical(override: str) -> str:
    """``trainer.x=False`` and ``trainer.x=false`` (or ``1e-3`` and ``0.001``) are the same override."""
    import yaml

    key, _, value = override.partition("=")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return f"{key.lstrip('+~')}={json.dumps(parsed, sort_keys=True, default=str)}"


def val_metrics(runs: Sequence[RunInfo]) -> list[str]:
    names = {m for r in runs for m in r.curves if m.startswith("val/")}
    return sorted(names, key=lambda m: (m != "val/loss", m.count("/"), m))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


def table_rows(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows (one per run) and the overrides common to all runs."""
    common, differing = split_overrides(runs)
    metrics = val_metrics(runs)
    arrows = {"min": " (min)", "max": " (max)", None: ""}
    header = ["run", "plugin", "overrides", "steps", "wall time"] + [f"{m}{arrows[direction(m)]}" for m in metrics]
    rows = []
    for r in runs:
        steps = "-" if r.steps is None else f"{r.steps}" + ("" if r.finished else "*")
        shown = " ".join(differing[r.label]) or "-"
        if len(shown) > _OVERRIDES_WIDTH:  # the whole list is in summary.csv
            shown = shown[: _OVERRIDES_WIDTH - 1] + "…"
        cells = [r.label, r.plugin, shown, steps, _duration(r.wall_s)]
        for m in metrics:
            final, best = r.final(m), r.best(m)
            cells.append(_number(final) + (f" ({_number(best)})" if best is not None else ""))
        rows.append(cells)
    return header, rows, common


def format_table(runs: Sequence[RunInfo]) -> str:
    """The table ``modalforge compare`` prints: one line per run, columns padded."""
    header, rows, common = table_rows(runs)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = []
    if common:
        lines.append("common to all runs: " + " ".join(common))
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    notes = ["metric cells: final (best); best = min or max as the header says"]
    if any(not r.finished for r in runs):
        notes.append("* unfinished (no finished.json): steps logged so far")
    lines.append("; ".join(notes))
    return "\n".join(lines)


def _write_csv(runs: Sequence[RunInfo], file: Path) -> None:
    _, differing = split_overrides(runs)
    metrics = val_metrics(runs)
    with file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "path", "plugin", "overrides", "steps", "finished", "wall_s"]
                        + [f"{m} {kind}" for m in metrics for kind in ("final", "best")])
        for r in runs:
            writer.writerow([r.label, str(r.path), r.plugin, " ".join(differing[r.label]), r.steps, r.finished,
                             None if r.wall_s is None else round(r.wall_s, 1)]
                            + [v for m in metrics for v in (r.final(m), r.best(m))])


def compare(paths: Sequence[str | Path], out: str | Path | None = None, plots: bool = True) -> Path:
    """Print the table of the runs in ``paths`` and write the report into ``out``.

    Args:
        paths: run directories and/or sweep directories (their runs are found below them).
        out: the report's folder; default ``<first path>/compare``.
        plots: draw PNGs with matplotlib (the table and copies are written regardless).

    Returns:
        The report's folder: ``summary.txt``, ``summary.csv``, ``*.png``, ``index.html``.

    Raises:
        RunDirError: a path that does not exist or holds no run.
    """
    runs = [load_run(path, label) for path, label in find_runs(paths)]
    out = Path(out) if out is not None else Path(paths[0]) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(runs)
    print(table)
    (out / "summary.txt").write_text(table + "\n")
    _write_csv(runs, out / "summary.csv")
    from modalforge.compare import plots as compare_plots

    written = compare_plots.copy_artifacts(runs, out)
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ModuleNotFoundError:
            print('[modalforge] no plots: matplotlib is not installed (pip install "modalforge[plots]")')
        else:
            written = compare_plots.plot_all(runs, val_metrics(runs), out) + written
    compare_plots.write_index(table, written, out, runs)
    sys.stdout.flush()
    print(f"[modalforge] comparison of {len(runs)} runs written to {out}"
          + (f" ({len(written)} images)" if written else ""))
    return out


class CompareOnMultirunEnd(Callback):
    """Hydra callback: at the end of ``train -m ...`` write :func:`compare` of the sweep to ``<sweep dir>/compare``.

    Registered in ``conf/train.yaml`` as ``hydra.callbacks.compare``; drop it with
    ``~hydra.callbacks.compare``. A failure here is reported, never raised: the sweep's runs are done.

    Args:
        plots: draw PNGs (needs matplotlib).
    """

    def __init__(self, plots: bool = True) -> None:
        self.plots = plots

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            compare([sweep_dir], out=sweep_dir / "compare", plots=self.plots)
        except Exception as err:  # noqa: BLE001 - the summary must never fail a finished sweep
            print(f"[modalforge] could not compare the sweep's runs ({type(err).__name__}: {err}); "
                  f"retry with: modalforge compare {sweep_dir}", file=sys.stderr)
