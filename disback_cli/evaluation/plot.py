"""Curves of one or more backtrack runs from their metrics.jsonl: the evaluation metric and the
mean |D_fake - D_target| against iteration, with the target switches marked."""

from __future__ import annotations

import io
import itertools
import statistics
from pathlib import Path

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.evaluation.catalog import find_runs, run_row, unique_labels
from disback_cli.evaluation.groups import group_rows
from disback_cli.store.fileio import atomic_write_bytes
from disback_cli.store.metrics_log import read_metrics

PREFERRED_METRICS = ("fd_digits", "mmd2", "fid")
METHOD_NAMES = {"disback": "DisBack", "baseline": "baseline"}
# Metrics that live in [0, 1] (or count a few modes): drawn on a linear axis, the rest on a log one.
BOUNDED_METRICS = {
    "precision",
    "mode_tv",
    "modes_covered",
    "classes_covered",
    "max_class_share",
    "confidence",
    "recall",
}


def switch_iterations(lines: list[dict]) -> list[int]:
    """Iterations after which the target moved one node: logged exactly by `backtrack`
    (`target_switch_at`); for logs of older runs, the log line where the node changed."""
    exact = [ln["target_switch_at"] for ln in lines if "target_switch_at" in ln]
    if exact:
        return exact
    logged = [ln for ln in lines if "target_node" in ln]
    return [
        b["iteration"]
        for a, b in itertools.pairwise(logged)
        if a["target_node"] != b["target_node"]
    ]


def _grouped_runs(run_dirs: list[Path], group_by: list[str] | None) -> dict[str, list[list[dict]]]:
    """The runs' logs by legend entry: one per run, or one per group of `group_by` values
    (e.g. loss=dmd, method=disback over its seeds)."""
    paths = find_runs(run_dirs)
    rows = [run_row(p) for p in paths]
    if not group_by:  # a run by its name and what it is: "default (DisBack, vsd)"
        labels = unique_labels([str(p.absolute()) for p in paths])
        return {
            f"{label} ({METHOD_NAMES.get(row.get('method'), '?')}, {row.get('loss', '?')})": [
                read_metrics(p)
            ]
            for label, p, row in zip(labels, paths, rows, strict=True)
        }
    group_rows(rows, group_by)  # refuses a key no run has
    groups: dict[str, list[list[dict]]] = {}
    for path, row in zip(paths, rows, strict=True):
        label = ", ".join(f"{k}={row.get(k)}" for k in group_by)
        groups.setdefault(label, []).append(read_metrics(path))
    return groups


def _series(runs: list[list[dict]], value) -> tuple[list[int], list[list[float]]]:
    """The iterations every run of a group logged `value` at, and the runs' values there."""
    points = [
        {ln["iteration"]: v for ln in lines if (v := value(ln)) is not None} for lines in runs
    ]
    shared = sorted(set.intersection(*(set(p) for p in points))) if points else []
    return shared, [[p[i] for p in points] for i in shared]


def _draw(axis, runs: list[list[dict]], value, colour, label: str) -> list[int]:
    """One run as a line; a group as its median line with the [min, max] band over its runs.
    Returns the iterations drawn."""
    iterations, values = _series(runs, value)
    if not iterations:
        return []
    if len(runs) == 1:
        axis.plot(
            iterations, [v[0] for v in values], color=colour, label=label, marker="o", markersize=2
        )
        return iterations
    axis.plot(
        iterations,
        [statistics.median(v) for v in values],
        color=colour,
        label=f"{label} (n={len(runs)})",
    )
    axis.fill_between(
        iterations,
        [min(v) for v in values],
        [max(v) for v in values],
        color=colour,
        alpha=0.2,
        linewidth=0,
    )
    return iterations


def _readable(axis) -> None:
    """Plain tick labels (0.4, not 4×10⁻¹) on log axes too."""
    from matplotlib import ticker

    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if axis.get_yscale() == "log":
        axis.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(plain)
    axis.yaxis.set_minor_formatter(ticker.NullFormatter())
    axis.grid(alpha=0.3)


def plot_runs(
    run_dirs: list[Path], out: Path, metric: str | None = None, group_by: list[str] | None = None
) -> dict:
    """Write a two-panel PNG; return which metric was drawn. An unknown `metric` is refused with
    the metrics these runs logged. With `group_by`, one colour per group: its median and the
    band of its runs (seeds)."""
    groups = _grouped_runs(run_dirs, group_by)
    everything = [lines for runs in groups.values() for lines in runs]
    available = sorted({k for lines in everything for ln in lines for k in ln.get("eval", {})})
    if metric is not None and metric not in available:
        known = ", ".join(available) or "none: the runs had no --eval-every"
        raise ConfigError(f"--metric {metric!r} was not logged by these runs (logged: {known})")
    if metric is None:
        metric = next((m for m in PREFERRED_METRICS if m in available), None)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DisbackError("plotting needs matplotlib: pip install matplotlib") from None
    # One iteration axis for both panels: the score gap (first logged after training began)
    # lines up with the metric curve, which starts at G0 (iteration 0).
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained", sharex=True)
    palette = plt.get_cmap(
        "tab10" if len(groups) <= 10 else "tab20" if len(groups) <= 20 else "viridis"
    )
    count = max(len(groups), 1)
    drawn = {}  # label: [first, last] iteration of its metric curve
    for index, (label, runs) in enumerate(groups.items()):
        colour = palette(index if len(groups) <= 20 else index / max(count - 1, 1))
        iterations = _draw(left, runs, lambda ln: ln.get("eval", {}).get(metric), colour, label)
        if iterations:
            drawn[label] = [iterations[0], iterations[-1]]
        _draw(right, runs, lambda ln: ln.get("score_gap"), colour, label)
        if len(runs) == 1:
            for x in switch_iterations(runs[0]):
                right.axvline(x, color=colour, linestyle=":", linewidth=0.8)
    title = f"{metric} of the EMA generator" if metric else "no --eval-every in these runs"
    left.set(xlabel="generator iteration", ylabel=metric or "(not logged)", title=title)
    right.set(
        xlabel="generator iteration",
        ylabel="mean |D_fake - D_target|",
        title="score gap (dotted: target moves one node)",
    )
    left.set_yscale("linear" if metric in BOUNDED_METRICS else "log")
    right.set_yscale("log")
    for axis in (left, right):
        _readable(axis)
    handles, labels = right.get_legend_handles_labels()
    if handles:  # below the panels, never over the curves
        figure.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(3, len(handles)),
            fontsize="small",
        )
    scale = left.get_yscale()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(out, buffer.getvalue())
    return {
        "out": str(Path(out).absolute()),
        "metric": metric,
        "runs": list(groups) if not group_by else [],
        "groups": {label: len(runs) for label, runs in groups.items()} if group_by else {},
        "scale": scale,
        "eval_iterations": drawn,
    }


def scatter_png(points, title: str) -> bytes:
    """2-D samples (the ring's) as a scatter plot, PNG bytes: the picture `sample --grid` draws
    for vector generators."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DisbackError("plotting needs matplotlib: pip install matplotlib") from None
    figure, axis = plt.subplots(figsize=(5, 5), layout="constrained")
    axis.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, linewidths=0)
    axis.set(aspect="equal", title=title, xlabel="x[0]", ylabel="x[1]")
    axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
