"""`disback evaluate`: distances between samples and the ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from disback_cli.cli._common import JsonOpt, emit_json, stdout
from disback_cli.datasets import DATASETS
from disback_cli.errors import DisbackError
from disback_cli.evaluation import evaluate_vectors
from disback_cli.generate import read_samples


def evaluate(
    samples: Annotated[Path, typer.Argument(help=".npz written by `disback sample`.")],
    dataset: Annotated[
        str | None,
        typer.Option(help=f"Ground truth ({', '.join(DATASETS)}) [default: from the samples]."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare samples with exact ground-truth samples: MMD, sliced W2, mode statistics.

    The 'floor' row scores a second exact sample of the same size: the best a generator can
    reach at this n.

    Example: disback evaluate runs/t1/samples.npz --json
    """
    data, meta = read_samples(samples)
    dataset = dataset or meta.get("dataset")
    if dataset is None:
        raise DisbackError(f"{samples}: unknown ground truth; pass --dataset")
    if dataset not in DATASETS:
        raise DisbackError(
            f"no ground truth for data set {dataset!r} (known: {', '.join(DATASETS)})"
        )
    report = {"samples": str(samples), **evaluate_vectors(data, dataset), "provenance": meta}
    if json_out:
        emit_json(report)
        return
    table = Table(title=f"{samples} vs exact {dataset} samples (n={report['n']})")
    for column in ("metric", "samples", "floor (exact vs exact)"):
        table.add_column(column, justify="right")
    for key, value in report["metrics"].items():
        table.add_row(key, f"{value:.4g}", f"{report['floor'][key]:.4g}")
    stdout.print(table)
