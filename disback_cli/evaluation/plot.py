"""Curves of one or more backtrack runs from their metrics.jsonl: the evaluation metric and the
mean |D_fake - D_target| against iteration, with the target switches marked."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import atomic_write_bytes
from disback_cli.store.metrics_log import read_metrics

PREFERRED_METRICS = ("fd_digits", "mmd2", "fid")


def plot_runs(run_dirs: list[Path], out: Path, metric: str | None = None) -> dict:
    """Write a two-panel PNG; return which metric was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DisbackError("plotting needs matplotlib: pip install matplotlib") from None
    runs = {
        Path(r).name if Path(r).name != "default" else "disback": read_metrics(r) for r in run_dirs
    }
    if metric is None:
        available = {k for lines in runs.values() for ln in lines for k in ln.get("eval", {})}
        metric = next((m for m in PREFERRED_METRICS if m in available), None)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (name, lines), colour in zip(
        runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False
    ):
        evals = [
            (ln["iteration"], ln["eval"][metric])
            for ln in lines
            if metric and metric in ln.get("eval", {})
        ]
        if evals:
            left.plot(*zip(*evals, strict=True), marker="o", markersize=3, color=colour, label=name)
        logged = [ln for ln in lines if "score_gap" in ln]
        right.plot([ln["iteration"] for ln in logged], [ln["score_gap"] for ln in logged],
                   color=colour, label=name)  # fmt: skip
        switches = [
            b["iteration"]
            for a, b in itertools.pairwise(logged)
            if a["target_node"] != b["target_node"]
        ]
        for x in switches:
            right.axvline(x, color=colour, linestyle=":", linewidth=0.8)
    title = f"{metric} of the EMA generator" if metric else "no --eval-every in these runs"
    left.set(xlabel="generator iteration", ylabel=metric or "(not logged)", title=title)
    right.set(xlabel="generator iteration", ylabel="mean |D_fake - D_target|",
              title="score gap (dotted: target moves one node)")  # fmt: skip
    for axis in (left, right):
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(out, buffer.getvalue())
    return {"out": str(out), "metric": metric, "runs": list(runs)}
