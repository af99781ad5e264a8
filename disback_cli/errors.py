"""Errors meant for the user: the CLI prints their message as one line, without a traceback."""

from __future__ import annotations

from pydantic import ValidationError


def one_line(text: str) -> str:
    """Messages quote names and values from files anyone may write: keep them to one line of
    printable characters (no terminal escapes, no forged extra lines)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def summary_of(exc: BaseException, limit: int = 300) -> str:
    """A library's exception as one line: its first line, with the next one when the first only
    introduces it ("Error(s) in loading state_dict for CLIPModel:"), at most `limit` characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DisbackError(Exception):
    """A problem with the user's input or files, explained in one line (made one line here,
    whatever a file put into the message)."""

    exit_code = 1

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))


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
