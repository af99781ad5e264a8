"""The root `disback` command and its error handling.

Exit codes: 0 success, 1 bad input or failed run, 2 bad flags or configuration,
130 interrupted (state saved; rerun the same command to resume).
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated

import typer
from pydantic import ValidationError
from typer.exceptions import Abort, TyperException

from disback_cli import __version__
from disback_cli.cli import (
    backtrack,
    demo,
    doctor,
    evaluate,
    export,
    plot,
    record,
    runs,
    sample,
    teacher,
)
from disback_cli.cli._common import Flag
from disback_cli.errors import DisbackError, InterruptedRun, describe_validation_error, one_line

app = typer.Typer(
    name="disback",
    help="Distill a diffusion teacher into a one-step generator with DisBack.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's help: flag names whole at any width, plain when piped
    context_settings={"max_content_width": 120},
)
app.command()(record.record)
app.command()(backtrack.backtrack)
app.command()(sample.sample)
app.command()(evaluate.evaluate)
app.command()(export.export)
app.command()(plot.plot)
app.command()(runs.runs)
app.command()(demo.demo)
app.command()(doctor.doctor)
app.add_typer(teacher.app, name="teacher")


def _version(value: bool) -> None:
    if value:
        print(f"disback {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[
        bool, Flag("--debug", help="Show tracebacks (may also follow the command).")
    ] = False,
    version: Annotated[
        bool, Flag("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Distill a diffusion teacher into a one-step generator with DisBack.

    Stages: record (degradation path) -> backtrack (train the generator) -> sample -> evaluate.
    """


INTERRUPTED = "interrupted; the files disback had finished are kept (each is written whole)"


def _shutdown() -> None:
    """End torchrun's process group, if a command started one (`--help` never imports torch)."""
    if "disback_cli.runtime.parallel" in sys.modules:
        sys.modules["disback_cli.runtime.parallel"].shutdown()


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:  # accept --debug anywhere; the root option must come first
        args = ["--debug", *(a for a in args if a != "--debug")]
    try:
        code = app(args=args, prog_name="disback", standalone_mode=False)
        _shutdown()
        if code == 130:  # Typer's silent answer to a Ctrl-C that no stage caught
            raise KeyboardInterrupt
    except InterruptedRun as exc:
        _fail(str(exc), 130)
    except DisbackError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except TyperException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except (Abort, KeyboardInterrupt):
        _fail(INTERRUPTED, 130)
    except ValidationError as exc:  # a value checked where no one-line message was written
        if debug:
            raise
        _fail(describe_validation_error(exc), 1)
    except OSError as exc:  # files we did not anticipate: name the file and the reason
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", 1)
    except Exception as exc:
        if debug:
            raise
        _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)", 1)
    sys.exit(code or 0)
