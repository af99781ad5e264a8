"""evaluations.jsonl of a backtrack run: what `disback evaluate` measured on the run's generator
files, one report per line, so a model card can quote the last evaluation of the exact weights it
exports (matched by the generator file's sha256) with its provenance."""

from __future__ import annotations

import json
from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import atomic_write_bytes, parse_json, read_regular_file
from disback_cli.store.layout import EVALUATIONS, check_no_links

MAX_EVALUATIONS_BYTES = 64 << 20
MAX_LINE_BYTES = 1 << 20  # one report: results of every repeat, reference and detector


def read_evaluations(run_dir: Path) -> list[dict]:
    """The reports recorded for a run (none if it has no file), each a JSON object."""
    path = check_no_links(Path(run_dir), EVALUATIONS)
    if not path.exists():
        return []
    reports = []
    data = read_regular_file(path, MAX_EVALUATIONS_BYTES, "evaluations log")
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            report = parse_json(line) if len(line) <= MAX_LINE_BYTES else None
        except (UnicodeDecodeError, ValueError):
            report = None
        if not (isinstance(report, dict) and isinstance(report.get("generator_sha256"), str)):
            raise DisbackError(f"{path}: line {number} is not an evaluation report")
        reports.append(report)
    return reports


def add_evaluation(run_dir: Path, report: dict) -> None:
    """Append one report (with its `generator_sha256`), rewriting the file atomically."""
    line = json.dumps(report, sort_keys=True, allow_nan=False).encode()
    if len(line) > MAX_LINE_BYTES:
        raise DisbackError(f"an evaluation report of {len(line):,} bytes is too large to record")
    path = check_no_links(Path(run_dir), EVALUATIONS)
    old = (
        read_regular_file(path, MAX_EVALUATIONS_BYTES, "evaluations log") if path.exists() else b""
    )
    if len(old) + len(line) + 1 > MAX_EVALUATIONS_BYTES:
        raise DisbackError(f"{path}: full ({len(old):,} bytes); move it away to record more")
    atomic_write_bytes(path, old + line + b"\n")
