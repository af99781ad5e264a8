"""Curves of one or more backtrack runs from their metrics.jsonl: the evaluation metric and the
mean |D_fake - D_target| against iteration, with the target switches marked."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.evaluation.catalog import unique_labels
from disback_cli.store.fileio import atomic_write_bytes
from disback_cli.store.metrics_log import read_metrics

PREFERRED_METRICS = ("fd_digits", "mmd2", "fid")
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


def plot_runs(run_dirs: list[Path], out: Path, metric: str | None = None) -> dict:
    """Write a two-panel PNG; return which metric was drawn. An unknown `metric` is refused with
    the metrics these runs logged."""
    labels = unique_labels([str(Path(r).absolute()) for r in run_dirs])
    runs = dict(zip(labels, (read_metrics(r) for r in run_dirs), strict=True))
    available = sorted({k for lines in runs.values() for ln in lines for k in ln.get("eval", {})})
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
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (name, lines), colour in zip(runs.items(), itertools.cycle(colours), strict=False):
        evals = [
            (ln["iteration"], ln["eval"][metric])
            for ln in lines
            if metric and metric in ln.get("eval", {})
        ]
        if evals:
            left.plot(*zip(*evals, strict=True), marker="o", markersize=3, color=colour, label=name)
        logged = [ln for ln in lines if "score_gap" in ln]
        right.plot(
            [ln["iteration"] for ln in logged],
            [ln["score_gap"] for ln in logged],
            color=colour,
            label=name,
        )
        for x in switch_iterations(lines):
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
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    scale = left.get_yscale()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(out, buffer.getvalue())
    return {"out": str(Path(out).absolute()), "metric": metric, "runs": list(runs), "scale": scale}
