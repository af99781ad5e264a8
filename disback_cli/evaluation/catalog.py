"""Backtrack runs found below directories, one row each: what `disback runs` tabulates.

A sweep leaves many runs behind (losses x methods x seeds); each row says what the run was (its
resolved config), how far it got, how long it took, and its final and best logged metrics. The
directories are searched without following links, to a bounded depth; a manifest that does not
read is named in the row instead of ending the listing.
"""

from __future__ import annotations

import os
from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.evaluation.reports import HIGHER_IS_BETTER
from disback_cli.store.layout import BACKTRACK_FOLDER, MANIFEST
from disback_cli.store.manifests import BacktrackManifest, read_manifest
from disback_cli.store.metrics_log import read_metrics

MAX_DEPTH = 8  # directory levels searched below each given directory
MAX_RUNS = 10_000
CONFIG_COLUMNS = (
    "loss",
    "no_trajectory",
    "interval",
    "switch",
    "fake_steps",
    "batch",
    "lr_g",
    "lr_fake",
    "iters",
    "seed",
)


def find_runs(directories: list[Path]) -> list[Path]:
    """Backtrack run directories at or below `directories`, in path order, each once."""
    found: dict[Path, None] = {}
    for top in directories:
        top = Path(top)
        if not top.is_dir():
            raise DisbackError(f"{top}: not a directory")
        for root, dirs, _ in os.walk(top, followlinks=False):
            depth = len(Path(root).relative_to(top).parts)
            dirs[:] = sorted(d for d in dirs if not (Path(root) / d).is_symlink())
            if depth >= MAX_DEPTH:
                dirs.clear()
            manifest = Path(root) / MANIFEST
            in_runs_folder = Path(root).parent.name == BACKTRACK_FOLDER
            if in_runs_folder and manifest.is_file() and not manifest.is_symlink():
                found[Path(root).absolute()] = None
                dirs.clear()  # a run's own folders hold no runs
            if len(found) > MAX_RUNS:
                raise DisbackError(f"more than {MAX_RUNS} runs below {top}; name fewer folders")
    return list(found)


def _best(lines: list[dict], key: str) -> tuple[float, int] | None:
    points = [(ln["eval"][key], ln["iteration"]) for ln in lines if key in ln.get("eval", {})]
    if not points:
        return None
    pick = max if key in HIGHER_IS_BETTER else min
    return pick(points, key=lambda point: point[0])


def run_row(run_dir: Path) -> dict:
    """One run's row: identity, progress, wall time, final and best metrics."""
    row: dict = {
        "run": str(run_dir),
        "trajectory": str(run_dir.parent.parent),
        "name": run_dir.name,
    }
    try:
        manifest = read_manifest(run_dir, BacktrackManifest)
        lines = read_metrics(run_dir)
    except DisbackError as exc:
        return {**row, "status": "unreadable", "error": str(exc)}
    config = manifest.config
    row.update(
        status=manifest.status,
        step=manifest.step,
        seconds=manifest.elapsed_seconds,
        method="baseline" if config.no_trajectory else "disback",
    )
    row.update({key: getattr(config, key) for key in CONFIG_COLUMNS})
    evals = [ln for ln in lines if "eval" in ln]
    if evals:
        row["eval_iteration"] = evals[-1]["iteration"]
        for key, value in evals[-1]["eval"].items():
            if key.endswith("_total") or key == "n":  # sizes, not scores
                continue
            row[f"final_{key}"] = value
            row[f"best_{key}"], row[f"best_{key}_at"] = _best(evals, key)
    logged = [ln for ln in lines if "score_gap" in ln]
    if logged:
        row["final_score_gap"] = logged[-1]["score_gap"]
    return row


def unique_labels(paths: list[str]) -> list[str]:
    """The shortest trailing parts of each path that tell them apart."""
    parts = [Path(p).parts for p in paths]
    for length in range(1, max(map(len, parts), default=0) + 1):
        labels = ["/".join(p[-length:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(paths)
