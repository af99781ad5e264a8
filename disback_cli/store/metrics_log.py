"""metrics.jsonl of a backtrack run: one JSON object per logged iteration, appended as training
goes, cut back to the resume point when a run resumes (so a resumed log equals an uninterrupted
one), and read back checked."""

from __future__ import annotations

import json
from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import (
    atomic_write_bytes,
    parse_json,
    read_regular_file,
)
from disback_cli.store.layout import METRICS, check_no_links

MAX_METRICS_BYTES = 1 << 30


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to the resume point, up to the first line that is not one of ours
    (a line cut short by a kill)."""
    if not path.exists():
        return
    keep = []
    data = read_regular_file(path, MAX_METRICS_BYTES, "metrics log")  # never a FIFO's wait
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and isinstance(record.get("iteration"), int)):
                break
        except (ValueError, RecursionError):
            break
        if record["iteration"] > step:
            break
        keep.append(line + b"\n")
    atomic_write_bytes(path, b"".join(keep))


GROUPS = ("eval", "mismatch")  # objects of numbers inside a line


def _check_line(line: object) -> dict:
    """A metrics line as `backtrack` writes it: an iteration, numbers, and `eval` and `mismatch`
    objects of numbers."""
    if not isinstance(line, dict) or type(line.get("iteration")) is not int:
        raise ValueError("not an object with an integer 'iteration'")
    numbers = [v for k, v in line.items() if k not in GROUPS]
    for group in GROUPS:
        values = line.get(group, {})
        if not isinstance(values, dict):
            raise ValueError(f"'{group}' must be an object")
        numbers += list(values.values())
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise ValueError("values must be numbers")
    return line


def read_metrics(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl, each checked (a malformed line is named)."""
    path = check_no_links(Path(run_dir), METRICS)
    if not path.exists():
        raise DisbackError(f"{run_dir}: no {METRICS} (is this a backtrack run directory?)")
    text = read_regular_file(path, MAX_METRICS_BYTES, "metrics log")
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append(_check_line(parse_json(line)))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DisbackError(f"{path}: line {number} is not a metrics line ({exc})") from None
    return lines


class MetricsLog:
    """Appends lines to a run's metrics.jsonl; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.file = open(path, "a") if enabled else None  # noqa: SIM115 (closed by close())

    def write(self, iteration: int, line: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"iteration": iteration, **line}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
