"""`disback runs`: a table of backtrack runs across trajectories, for sweeps."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from disback_cli.cli._common import Flag, JsonOpt, emit_json, stdout
from disback_cli.errors import ConfigError, one_line
from disback_cli.evaluation.catalog import find_runs, run_row, unique_labels

SHOWN = ("run", "status", "step", "method", "loss", "interval", "seed", "seconds")
HEADLINE = ("fd_digits", "mmd2", "fid", "precision", "classes_covered", "modes_covered")


def _matches(row: dict, condition: str) -> bool:
    key, _, value = condition.partition("=")
    return str(row.get(key)).lower() == value.lower()


def _sort_key(key: str):
    def value(row: dict):
        v = row.get(key)
        # missing values last; numbers and text each in their own order
        return (v is None, isinstance(v, str), v if v is not None else 0)

    return value


def runs(
    directories: Annotated[
        list[Path], typer.Argument(help="Trajectories, run directories or folders holding them.")
    ],
    sort: Annotated[
        str | None,
        typer.Option(help="Row key to sort by, e.g. final_mmd2; '-KEY' sorts descending."),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="Keep rows whose KEY equals VALUE (repeatable)."),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated row keys for the text table [default: run, status, "
            "step, method, loss, interval, seed, seconds, final_*]."
        ),
    ] = None,
    csv_out: Annotated[bool, Flag("--csv", help="Every row key as CSV on stdout.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """One row per backtrack run: its config, progress, wall time, final and best metrics.

    Example: disback runs runs/ --sort final_mmd2 --where loss=dmd
    """
    for condition in where or []:
        if "=" not in condition:
            raise ConfigError(f"--where {condition!r:.60}: expected KEY=VALUE, e.g. loss=dmd")
    rows = [run_row(path) for path in find_runs(directories)]
    for row, label in zip(rows, unique_labels([r["run"] for r in rows]), strict=True):
        row["label"] = label
    rows = [row for row in rows if all(_matches(row, c) for c in where or [])]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    if sort is not None:
        key = sort.removeprefix("-")
        if rows and key not in keys:
            raise ConfigError(
                f"--sort {key!r}: no such key in these rows (keys: {', '.join(keys)})"
            )
        rows.sort(key=_sort_key(key), reverse=sort.startswith("-"))
    if json_out:
        emit_json(rows)
    elif csv_out:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
    else:
        _print(rows, keys, columns)


def _cell(value: object) -> Text:
    """A table cell as plain text: folder names and manifest values are anyone's, so control
    characters are shown escaped and rich markup is not interpreted."""
    if value is None:
        return Text("-")
    return Text(one_line(f"{value:.4g}" if isinstance(value, float) else str(value)))


def _print(rows: list[dict], keys: list[str], columns: str | None) -> None:
    if columns:
        shown = [c.strip() for c in columns.split(",") if c.strip()]
        unknown = [c for c in shown if c not in keys]
        if rows and unknown:
            raise ConfigError(f"--columns {unknown[0]!r}: no such key (keys: {', '.join(keys)})")
    else:
        finals = [f"final_{k}" for k in HEADLINE if f"final_{k}" in keys][:3]
        shown = [k for k in SHOWN if k in keys or k == "run"] + finals
    table = Table(title=f"{len(rows)} backtrack runs")
    for column in shown:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        cells = [row["label"] if c == "run" else row.get(c) for c in shown]
        table.add_row(*(_cell(v) for v in cells))
    stdout.print(table)
