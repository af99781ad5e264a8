"""`disback demo`: the whole pipeline on the built-in digits in a few minutes on a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from disback_cli.cli._common import DeviceOpt, Flag, JsonOpt, QuietOpt, emit_json, reporting, stdout


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the run.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[bool, Flag("--quick", help="A much shorter version (tests).")] = False,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Distill builtin:digits with DisBack: record, backtrack, sample, evaluate, grids and curves.

    Example: disback demo --out runs/demo
    """
    from disback_cli.stages.demo import run_demo

    with reporting(quiet or json_out) as reporter:
        summary = run_demo(out, quick, device or "auto", reporter)
    if json_out:
        emit_json(summary)
        return
    if quiet:
        return
    table = Table(title=f"builtin:digits, n={summary['n']} each, FD-digits vs the train split")
    for column in ("samples", "FD-digits", "classes", "max share", "sampling s"):
        table.add_column(column, justify="right")
    for row in summary["rows"]:
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        table.add_row(
            row["samples"],
            f"{row['fd_digits']:.2f}",
            f"{row['classes_covered']}/{row['classes_total']}",
            f"{row['max_class_share']:.1%}",
            seconds,
        )
    stdout.print(table)
    times = summary["stage_seconds"]
    stdout.print(
        f"record {times['record']} s, backtrack {times['backtrack']} s, "
        f"total {summary['total_seconds']} s"
    )
    stdout.print(
        f"grids (teacher | G0 | distilled): {summary['grids']}; curves: {summary['curves']}"
    )
