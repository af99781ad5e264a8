"""Options, output and progress shared by the commands."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
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

from disback_cli.config import FAMILY_DEFAULTS
from disback_cli.method.losses import GENERATOR_LOSSES
from disback_cli.runtime.reporting import Reporter


def Flag(*names: str, **kwargs: Any) -> Any:
    """An option that takes no value: shown without a `<bool>` metavar."""
    return typer.Option(*names, metavar="", **kwargs)


console = Console(stderr=True, highlight=False)  # progress and messages
# results: tables and summaries (wide when piped, so a sweep's table is not squeezed to 80)
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML recipe; flags override its values.")
]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto.")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed.")]
ForceOpt = Annotated[
    bool,
    Flag(
        "--force",
        help="Discard an existing run with another configuration (backtrack: also train on a "
        "path recorded at other noise levels).",
    ),
]
VerifyOpt = Annotated[
    bool | None,
    Flag(
        "--verify/--no-verify",
        help="Check the sha256 of every file a manifest names (skip for huge trusted files).",
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        metavar="<fp32|bf16>",
        help="fp32, or bf16: networks under bfloat16 autocast, fp32 weights and losses.",
    ),
]
Tf32Opt = Annotated[
    bool | None, Flag("--tf32/--no-tf32", help="Allow TF32 on CUDA (default: off).")
]
CompileOpt = Annotated[
    bool | None, Flag("--compile/--no-compile", help="torch.compile the networks.")
]
ChannelsLastOpt = Annotated[
    bool | None,
    Flag(
        "--channels-last/--no-channels-last",
        help="Channels-last image tensors (default: on for images on CUDA).",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        help="CPU threads per process \\[default: OMP_NUM_THREADS, else the cores available "
        "divided by the processes on this host].",
        show_default=False,
    ),
]
CheckpointingOpt = Annotated[
    bool | None,
    Flag(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations of trained text-to-image UNets in the backward pass.",
    ),
]
PromptsOpt = Annotated[
    str | None,
    typer.Option(help="Prompt file (one a line, or a JSON list) of a text-to-image teacher."),
]
JsonOpt = Annotated[bool, Flag("--json", help="Print a JSON summary on stdout.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Any config key, also those without a flag (e.g. --set ema_rampup=0.3); repeatable.",
    ),
]
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
        self.progress, self.task = progress, None

    def start(self, description: str, total: int, completed: int) -> None:
        self.task = self.progress.add_task(description, total=total, completed=completed, info="")

    def advance(self, completed: int, **fields: float) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        self.progress.update(self.task, completed=completed, info=info)

    def note(self, text: str) -> None:
        self.progress.console.print(text)


class MessageReporter:
    """No bar (not a terminal, or --json): notes only, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def start(self, description: str, total: int, completed: int) -> None:
        pass

    def advance(self, completed: int, **fields: float) -> None:
        pass

    def note(self, text: str) -> None:
        if not self.quiet:
            console.print(text)


@contextlib.contextmanager
def reporting(quiet: bool = False) -> Iterator[Reporter]:
    if quiet or not console.is_terminal:
        yield MessageReporter(quiet)
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
        yield RichReporter(progress)


def choices(model: type, field: str) -> str:
    """The metavar listing a config field's choices, e.g. `<even|distance>` (the values are
    checked by the config model, so recipes and flags get the same message)."""
    if field == "loss":
        values = list(GENERATOR_LOSSES)
    else:
        values = [
            v
            for arg in typing.get_args(model.model_fields[field].annotation)
            for v in (typing.get_args(arg) or [arg])
            if isinstance(v, str)
        ]
    return "<" + "|".join(values) + ">"


def describe(model: type, field: str) -> str:
    """Help text of a config field with its default, so flags and recipes share one source."""
    info = model.model_fields[field]
    if info.is_required():
        return f"{info.description} (required)"
    if field in FAMILY_DEFAULTS:
        by_family = ", ".join(
            f"{value:g} {family}" for family, value in FAMILY_DEFAULTS[field].items()
        )
        return f"{info.description} \\[default by teacher: {by_family}]"
    default = info.get_default(call_default_factory=True)
    shown = "none" if default is None else default
    return f"{info.description} \\[default: {shown}]"
