"""Options, output and progress shared by the commands."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from disback_cli.runtime.reporting import Reporter


def Flag(*names: str, **kwargs: Any) -> Any:
    """An option that takes no value: shown without a `<bool>` metavar."""
    return typer.Option(*names, metavar="", **kwargs)


# progress and messages; in a log file (not a terminal) a message stays one line
console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())
# results: tables and summaries (wide when piped, so a sweep's table is not squeezed to 80)
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def table_width() -> int:
    """The width a table must fit: the terminal's, or COLUMNS when piped and set (160 if not)."""
    if stdout.is_terminal or not os.environ.get("COLUMNS", "").isdigit():
        return stdout.width
    return int(os.environ["COLUMNS"])


DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")]
VerifyOpt = Annotated[
    bool | None,
    Flag(
        "--verify/--no-verify",
        help="Check the sha256 of every file a manifest names (skip for huge trusted files).",
    ),
]
ForceOpt = Annotated[
    bool,
    Flag(
        "--force",
        help="Discard an existing run with another configuration (backtrack: also train on a "
        "path recorded at other noise levels).",
    ),
]
JsonOpt = Annotated[bool, Flag("--json", help="Print a JSON summary on stdout.")]
QuietOpt = Annotated[bool, Flag("--quiet", "-q", help="No progress bar or messages.")]


def _finite(obj: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers, and scripts parse our output."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    """Strict JSON on stdout (no NaN or Infinity tokens)."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} it/s" if task.speed else "- it/s", style="cyan")


class RichReporter:
    """Progress bar with it/s and the latest loss values, on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress, self.task, self.latest = progress, None, {}
        self.waiting = None  # a phase before the first loop (opening a teacher): a bar of no length

    def start(self, description: str, total: int, completed: int) -> None:
        self.end_waiting()
        self.task = self.progress.add_task(description, total=total, completed=completed, info="")
        self.latest = {}

    def end_waiting(self) -> None:
        if self.waiting is not None:
            self.progress.remove_task(self.waiting)
            self.waiting = None

    def advance(self, completed: int, **fields: float) -> None:
        self.latest.update(fields)  # an evaluation's metrics stay shown until the next one
        self.progress.update(self.task, completed=completed, info=_values(self.latest))

    def phase(self, text: str) -> None:
        if self.task is not None:
            task = next(t for t in self.progress.tasks if t.id == self.task)
            if not task.finished:  # a finished bar keeps its final values
                self.progress.update(self.task, info=text)  # until the next advance
            return
        self.end_waiting()
        self.waiting = self.progress.add_task(text, total=None, info="")

    def note(self, text: str) -> None:
        self.progress.console.print(text)

    def warn(self, text: str) -> None:
        self.progress.console.print(f"warning: {text}", markup=False, highlight=False)


class MessageReporter:
    """No bar (not a terminal, or --json): notes only, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def start(self, description: str, total: int, completed: int) -> None:
        pass

    def advance(self, completed: int, **fields: float) -> None:
        pass

    def phase(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        if not self.quiet:
            console.print(text)

    def warn(self, text: str) -> None:
        print(f"warning: {text}", file=sys.stderr)  # one line, even with --json or --quiet


PROGRESS_SECONDS = 30.0


class LogReporter(MessageReporter):
    """Not a terminal (a batch job, nohup, a log file): plain progress lines on stderr, one at
    most every `every` seconds, one whenever a report carries values beyond the routine ones (an
    evaluation's metrics), and a closing line with the final values; never wrapped."""

    def __init__(self, every: float = PROGRESS_SECONDS, clock=time.monotonic) -> None:
        super().__init__(quiet=False)
        self.every, self.clock = every, clock
        self.description, self.total, self.first = "", 0, 0
        self.started = self.last = 0.0
        self.latest: dict[str, float] = {}
        self.routine: set[str] | None = None
        self.closed = False  # the closing line is written

    def start(self, description: str, total: int, completed: int) -> None:
        self.description, self.total, self.first = description, total, completed
        self.started = self.last = self.clock()
        self.latest, self.routine, self.closed = {}, None, False

    def advance(self, completed: int, **fields: float) -> None:
        if self.routine is None:  # what every report carries (losses); more is a measurement
            self.routine = set(fields)
        measured = bool(set(fields) - self.routine)
        self.latest.update(fields)
        now = self.clock()
        done = completed >= self.total
        if not (done or measured or now - self.last >= self.every):
            return
        self.last, seconds = now, now - self.started
        rate = (completed - self.first) / seconds if seconds > 0 else 0.0
        self.closed = done
        if done:
            head = f"{self.description}: done, {completed}/{self.total} in {_duration(seconds)}"
        else:
            eta = (self.total - completed) / rate if rate > 0 else None
            head = (
                f"{self.description}: {completed}/{self.total} "
                f"({100 * completed / max(self.total, 1):.0f}%), {rate:.3g} it/s, "
                f"ETA {_duration(eta) if eta is not None else '?'}"
            )
        values = _values(self.latest)
        print(f"{head}{', ' + values if values else ''}", file=sys.stderr, flush=True)

    def phase(self, text: str) -> None:
        """Said while a loop runs: before, a log gets the loop's own lines only (a refusal while
        a teacher opens stays the one line it is), and after, its closing line stays the last."""
        if self.description and not self.closed:
            print(f"{self.description}: {text}", file=sys.stderr, flush=True)


def _values(fields: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in fields.items())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@contextlib.contextmanager
def reporting(quiet: bool = False) -> Iterator[Reporter]:
    if quiet:
        yield MessageReporter(quiet)
        return
    if not console.is_terminal:
        yield LogReporter()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=console) as progress:
        reporter = RichReporter(progress)
        try:
            yield reporter
        finally:
            reporter.end_waiting()
