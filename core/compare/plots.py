"""The pictures of ``modalforge compare``: curves, confusion matrices, sample grids, and an index page.

matplotlib is optional (the ``plots`` extra) and imported only inside :func:`plot_all`;
copying a run's own images and confusion matrix needs nothing.
"""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from modalforge.compare import RunInfo


def slug(text: str) -> str:
    """A file-name-safe form of a metric or run name (``val/recall@1`` -> ``val_recall_1``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "run"


def copy_artifacts(runs: Sequence[RunInfo], out: Path) -> list[Path]:
    """Copy each run's latest sample grid PNGs and its confusion matrix CSV into ``out``."""
    written = []
    for run in runs:
        for name, png in run.images.items():
            target = out / f"samples_{slug(run.label)}_{slug(name)}_{png.stem}.png"
            shutil.copyfile(png, target)
            written.append(target)
        if run.confusion is not None:
            shutil.copyfile(run.confusion, out / f"confusion_{slug(run.label)}.csv")
    return written


def legend(run: RunInfo, differing: list[str], width: int = 60) -> str:
    text = f"{run.label}: {' '.join(differing)}" if differing else run.label
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_all(runs: Sequence[RunInfo], metrics: Sequence[str], out: Path) -> list[Path]:
    """Write ``loss.png``, one ``val_<metric>.png`` per validation metric, ``confusion_<run>.png``
    and ``samples.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and safe inside a training process
    import matplotlib.pyplot as plt

    from modalforge.compare import direction, split_overrides

    _, differing = split_overrides(runs)
    labels = {r.label: legend(r, differing[r.label]) for r in runs}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    if any("train/loss" in r.curves or "val/loss" in r.curves for r in runs):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            for metric, style in (("train/loss", dict(lw=1.4)), ("val/loss", dict(ls="--", marker="o", ms=4))):
                points = run.curves.get(metric)
                if points:
                    steps = sorted(points)
                    ax.plot(steps, [points[s] for s in steps], color=color, **style,
                            label=f"{labels[run.label]} ({metric.split('/')[0]})")
        _finish(ax, "loss (solid: train, dashed: validation)", "loss")
        written.append(_save(fig, out / "loss.png"))

    for metric in metrics:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        how = direction(metric)
        for i, run in enumerate(runs):
            points = run.curves.get(metric)
            if not points:
                continue
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="o", ms=4, color=colors[i % len(colors)],
                    label=labels[run.label])
            best = run.best(metric)
            if best is not None:
                at = next(s for s in steps if points[s] == best)
                ax.plot([at], [best], marker="*", ms=13, color=colors[i % len(colors)], mec="black")
        title = metric + {"min": " (lower is better; * best)", "max": " (higher is better; * best)", None: ""}[how]
        _finish(ax, title, metric)
        written.append(_save(fig, out / f"{slug(metric)}.png"))

    for run in runs:
        if run.confusion is not None:
            written.append(_plot_confusion(plt, run, out / f"confusion_{slug(run.label)}.png"))

    grids = [(run, name, png) for run in runs for name, png in run.images.items()]
    if grids:
        columns = min(3, len(grids))
        rows = (len(grids) + columns - 1) // columns
        fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4.8 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (run, name, png) in zip(axes.flat, grids):
            ax.imshow(plt.imread(str(png)), interpolation="nearest")
            ax.set_title(f"{legend(run, differing[run.label], 40)}\n{name}, {png.stem}", fontsize=9)
        written.append(_save(fig, out / "samples.png"))
    return written


def _finish(ax, title: str, ylabel: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _save(fig, path: Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_confusion(path: Path) -> tuple[list[str], list[list[int]]]:
    """``confusion_matrix.csv`` as image_classification writes it: class names, rows of counts (row = true)."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    classes = rows[0][1:]
    return classes, [[int(float(v)) for v in row[1:]] for row in rows[1:] if row]


def _plot_confusion(plt, run: RunInfo, path: Path) -> Path:  # noqa: ANN001 - matplotlib.pyplot
    classes, counts = read_confusion(run.confusion)  # type: ignore[arg-type]
    totals = [max(1, sum(row)) for row in counts]
    share = [[v / t for v in row] for row, t in zip(counts, totals)]
    size = min(12.0, 3.0 + 0.45 * len(classes))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    if len(classes) <= 25:  # counts are readable up to about this many classes
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if share[i][j] > 0.5 else "black")
    correct = sum(counts[i][i] for i in range(min(len(counts), len(classes))))
    ax.set_title(f"{run.label}: confusion matrix (accuracy {correct / max(1, sum(map(sum, counts))):.3f})")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _save(fig, path)


def latest_samples(run: RunInfo) -> tuple[int, list[tuple[str, str]]] | None:
    """The step and (input, sample) pairs of the last samples a run logged (``samples.jsonl``), if any."""
    rows = []
    files = [f for pattern in ("samples.jsonl", "*/samples.jsonl", "*/*/samples.jsonl")  # <log_dir>: csv/, resumed_N/
             for f in sorted(run.path.glob(pattern)) if "compare" not in f.relative_to(run.path).parts]
    for file in files:
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                rows.append((int(row["step"]), str(row.get("input", "")), str(row.get("sample", ""))))
            except (ValueError, KeyError, TypeError):
                continue
    if not rows:
        return None
    last = max(step for step, _, _ in rows)
    return last, [(given, sample) for step, given, sample in rows if step == last]


def write_index(table: str, images: Sequence[Path], out: Path, runs: Sequence[RunInfo] = ()) -> Path:
    """``index.html``: the table, every image and each run's latest text samples, to open in a browser.

    Everything that comes from a run (labels, override values in the table, model-generated
    samples) is HTML-escaped: a sample reading ``<script>`` is shown, never run.
    """
    esc = html.escape  # quote=True: safe inside attribute values too
    parts = ["<!doctype html><meta charset='utf-8'><title>modalforge compare</title>",
             "<h1>modalforge compare</h1>", f"<pre>{esc(table)}</pre>"]
    parts += [f"<h3>{esc(p.name)}</h3><img src='{esc(p.name)}' style='max-width:100%'>" for p in images]
    for run in runs:
        found = latest_samples(run)
        if found is not None:
            step, pairs = found
            lines = [f"[{i}] {esc(given)} -> {esc(sample)}" for i, (given, sample) in enumerate(pairs)]
            parts.append(f"<h3>samples of {esc(run.label)} at step {step}</h3><pre>" + "\n".join(lines) + "</pre>")
    path = out / "index.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
