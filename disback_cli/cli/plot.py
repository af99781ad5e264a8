"""`disback plot`: curves of backtrack runs from their metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disback_cli.cli._common import JsonOpt, emit_json, stdout
from disback_cli.evaluation.plot import plot_runs


def plot(
    runs: Annotated[list[Path], typer.Argument(help="Backtrack run directories (backtrack/NAME).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("curves.png"),
    metric: Annotated[
        str | None, typer.Option(help="Evaluation metric to draw [default: fd_digits or mmd2].")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Plot the logged evaluation metric and mean |D_fake - D_target| against iteration.

    Example: disback plot runs/t1/backtrack/default runs/t1/backtrack/baseline --out curves.png
    """
    summary = plot_runs(runs, out, metric)
    if json_out:
        emit_json(summary)
    else:
        stdout.print(f"wrote {out} ({summary['metric'] or 'no evaluation metric'})")
