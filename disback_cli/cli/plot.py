"""`disback plot`: curves of backtrack runs from their metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disback_cli.cli._common import JsonOpt, emit_json, stdout


def plot(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Backtrack runs (backtrack/NAME), trajectories or folders holding them."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("curves.png"),
    metric: Annotated[
        str | None, typer.Option(help="Evaluation metric to draw [default: fd_digits or mmd2].")
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(
            metavar="KEYS",
            help="Comma-separated run keys (e.g. loss,method): one colour per group, its median "
            "and the band of its runs (seeds).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Plot the logged evaluation metric and mean |D_fake - D_target| against iteration.

    Example: disback plot runs/t1/backtrack/default runs/t1/backtrack/baseline --out curves.png

    Over seeds: disback plot runs/sweep-seeds --group-by loss,method --out curves.png
    """
    from disback_cli.evaluation.plot import plot_runs

    by = [k.strip() for k in group_by.split(",") if k.strip()] if group_by else None
    summary = plot_runs(runs, out, metric, by)
    if json_out:
        emit_json(summary)
    else:
        stdout.print(f"wrote {out} ({summary['metric'] or 'no evaluation metric'})")
