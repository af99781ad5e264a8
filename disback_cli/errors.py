"""Errors meant for the user: the CLI prints their message as one line, without a traceback."""


class DisbackError(Exception):
    """A problem with the user's input or files, explained in one line."""

    exit_code = 1


class InterruptedRun(DisbackError):
    """The run stopped on a signal after saving its state; rerunning resumes it."""


class ConfigError(DisbackError):
    """Flags or recipe values that do not make sense (exit code 2, like a usage error)."""

    exit_code = 2
