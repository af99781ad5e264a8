"""`disback runs`: a table of backtrack runs across trajectories, for sweeps."""

from __future__ import annotations

import csv
import difflib
import io
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from disback_cli.cli._common import Flag, JsonOpt, emit_json, stdout, table_width
from disback_cli.errors import ConfigError, one_line
from disback_cli.evaluation.catalog import find_runs, run_row, unique_labels
from disback_cli.evaluation.groups import (
    compare_to_baseline,
    group_rows,
    metric_keys,
    parse_baseline,
)

SHOWN = ("run", "status", "step", "method", "loss", "interval", "seed", "seconds")
HEADLINE = ("fd_digits", "mmd2", "fid", "precision", "classes_covered", "modes_covered")


def _matches(row: dict, condition: str) -> bool:
    """KEY=VALUE: numbers compare as numbers (lr_g=1e-4 matches 0.0001), text without case."""
    key, _, value = condition.partition("=")
    have = row.get(key)
    if isinstance(have, (int, float)) and not isinstance(have, bool):
        try:
            return float(have) == float(value)
        except ValueError:
            return False
    return str(have).lower() == value.lower()


def _check_where_keys(conditions: list[str], keys: list[str]) -> None:
    """A --where key no row has is a typo, not an empty result."""
    for condition in conditions:
        key = condition.partition("=")[0]
        if keys and key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"--where {key!r}: no such key in these rows ({hint}keys: {', '.join(keys)})"
            )


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
    group_by: Annotated[
        str | None,
        typer.Option(
            metavar="KEYS",
            help="Comma-separated row keys, e.g. loss,method: one row per group with n and the "
            "mean, std, min and max of every metric over its runs (seeds).",
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            metavar="KEY=VALUE",
            help="With --group-by: each group against the group that differs only in these "
            "keys, e.g. method=baseline; a verdict only where the ranges do not overlap.",
        ),
    ] = None,
    csv_out: Annotated[bool, Flag("--csv", help="Every row key as CSV on stdout.")] = False,
    wide: Annotated[
        bool, Flag("--wide", help="Every column, however wide (else some are hidden to fit).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """One row per backtrack run: its config, progress, wall time, final and best metrics.

    Example: disback runs runs/ --sort final_mmd2 --where loss=dmd

    Over seeds: disback runs runs/ --group-by loss,method --baseline method=baseline
    """
    for condition in where or []:
        if "=" not in condition:
            raise ConfigError(f"--where {condition!r:.60}: expected KEY=VALUE, e.g. loss=dmd")
    rows = [run_row(path) for path in find_runs(directories)]
    for row, label in zip(rows, unique_labels([r["run"] for r in rows]), strict=True):
        row["label"] = label
    _check_where_keys(where or [], list(dict.fromkeys(k for row in rows for k in row)))
    rows = [row for row in rows if all(_matches(row, c) for c in where or [])]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    if sort is not None:
        key = sort.removeprefix("-")
        if rows and key not in keys:
            raise ConfigError(
                f"--sort {key!r}: no such key in these rows (keys: {', '.join(keys)})"
            )
        rows.sort(key=_sort_key(key), reverse=sort.startswith("-"))
    if group_by is not None:
        if columns is not None or sort is not None:
            raise ConfigError("--columns and --sort shape the per-run table; not with --group-by")
        by = [k.strip() for k in group_by.split(",") if k.strip()]
        _grouped(rows, by, baseline, (json_out, csv_out, wide))
        return
    if baseline is not None:
        raise ConfigError("--baseline compares groups: give --group-by too")
    if json_out:
        emit_json(rows)
    elif csv_out:
        _write_csv(rows, keys)
    else:
        _print(rows, keys, columns, wide)


def _write_csv(rows: list[dict], keys: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sys.stdout.write(buffer.getvalue())


def _cell(value: object) -> Text:
    """A table cell as plain text: folder names and manifest values are anyone's, so control
    characters are shown escaped and rich markup is not interpreted."""
    if value is None:
        return Text("-")
    return Text(one_line(f"{value:.4g}" if isinstance(value, float) else str(value)))


def _print(rows: list[dict], keys: list[str], columns: str | None, wide: bool) -> None:
    if columns:
        shown = [c.strip() for c in columns.split(",") if c.strip()]
        unknown = [c for c in shown if c not in keys]
        if rows and unknown:
            raise ConfigError(f"--columns {unknown[0]!r}: no such key (keys: {', '.join(keys)})")
    else:
        finals = [f"final_{k}" for k in HEADLINE if f"final_{k}" in keys][:3]
        shown = [k for k in SHOWN if k in keys or k == "run"] + finals
    if not rows:
        stdout.print("no backtrack runs found", markup=False)
        return
    cells = [[_cell(row["label"] if c == "run" else row.get(c)) for c in shown] for row in rows]
    _print_table(f"{len(rows)} backtrack runs", shown, cells, {"run"}, wide)


# Dropped first when a table is wider than the terminal: the columns that tell runs apart least.
DROPPED_FIRST = ("interval", "seconds", "step", "status", "seed")
BORDER = 3  # a column's padding and rule, in characters


def _print_table(title: str, columns: list[str], rows: list[list[Text]], left: set, wide: bool):
    """A table whose cells are never cut: without `wide`, columns are dropped (the least telling
    first, then from the right) until it fits the terminal, and the dropped ones are named."""
    widths = [max([len(c), *(len(row[i].plain) for row in rows)]) for i, c in enumerate(columns)]
    kept = list(range(len(columns)))
    order = [i for name in DROPPED_FIRST for i, c in enumerate(columns) if c == name]
    order += [i for i in reversed(range(1, len(columns))) if i not in order]
    needed = lambda: sum(widths[i] + BORDER for i in kept) + 1  # noqa: E731
    width = table_width()
    for index in order:
        if wide or needed() <= width:
            break
        kept.remove(index)
    table = Table(title=title, min_width=min(len(title), width))  # the title on one line
    for i in kept:
        justify = "left" if columns[i] in left else "right"
        table.add_column(Text(columns[i]), justify=justify, no_wrap=True)
    for row in rows:
        table.add_row(*(row[i] for i in kept))
    Console(file=stdout.file, highlight=False, width=max(width, needed())).print(table)
    dropped = [columns[i] for i in range(len(columns)) if i not in kept]
    if dropped:
        stdout.file.flush()
        print(
            f"hidden to fit {width} columns: {', '.join(dropped)} "
            "(--wide shows every column; --csv and --json hold them all)",
            file=sys.stderr,
        )


def _grouped(rows, by: list[str], baseline: str | None, outputs: tuple[bool, bool, bool]) -> None:
    json_out, csv_out, wide = outputs
    groups = group_rows(rows, by)
    if baseline is not None:
        compare_to_baseline(groups, parse_baseline(baseline, by))
    if json_out:
        emit_json(groups)
        return
    flat = [
        {
            **g["group"],
            "n": g["n"],
            **{f"{m}_{stat}": v for m, s in g["metrics"].items() for stat, v in s.items()},
        }
        for g in groups
    ]
    if csv_out:
        keys = list(dict.fromkeys(k for row in flat for k in row))
        _write_csv(flat, keys)
        return
    metrics = [m for m in metric_keys(rows) if m.startswith("final_")][:3] or ["seconds"]
    compared = baseline is not None
    columns = [*by, "n"]
    for metric in metrics:
        columns += [f"{metric} mean [min, max]"] + (["vs baseline"] if compared else [])
    cells = []
    for group in groups:
        row: list[object] = [*group["group"].values(), group["n"]]
        for metric in metrics:
            stats = group["metrics"].get(metric)
            row += [_spread(stats)] + ([_difference(stats)] if compared else [])
        cells.append([_cell(v) for v in row])
    title = f"{len(rows)} backtrack runs in {len(groups)} groups"
    _print_table(title, columns, cells, set(by), wide)


def _spread(stats: dict | None) -> str | None:
    if stats is None:
        return None
    return f"{stats['mean']:.4g} [{stats['min']:.4g}, {stats['max']:.4g}]"


def _difference(stats: dict | None) -> str | None:
    if stats is None or "vs_baseline" not in stats:
        return None
    verdict = f" {stats['verdict']}" if stats["verdict"] else ""
    return f"{stats['vs_baseline']:+.3g}{verdict}"
