"""Errors meant for the user: the CLI prints their message as one line, without a traceback."""

from __future__ import annotations

from pydantic import (
    ValidationError,
)


class DisbackError(Exception):
    """A problem with the user's input or files, explained in one line."""

    exit_code = 1


class InterruptedRun(DisbackError):
    """The run stopped on a signal after saving its state; rerunning resumes it."""


class ConfigError(DisbackError):
    """Flags or recipe values that do not make sense (exit code 2, like a usage error)."""

    exit_code = 2


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in err["loc"]).replace("_", "-")
        parts.append(f"{where}: {message}" if where else message)
    return "invalid configuration: " + "; ".join(parts)
