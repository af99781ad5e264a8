"""What a long loop tells its caller: the CLI shows a progress bar, tests may inject faults."""

from __future__ import annotations

import warnings
from typing import Protocol


class Reporter(Protocol):
    """What a long loop tells its caller: the CLI shows a progress bar, tests may inject faults."""

    def start(self, description: str, total: int, completed: int) -> None: ...

    def advance(self, completed: int, **fields: float) -> None: ...

    def phase(self, text: str) -> None:
        """What the loop does between two advances when that takes long (an evaluation)."""
        ...

    def note(self, text: str) -> None: ...

    def warn(self, text: str) -> None:
        """Something likely to waste the run, said even when notes are not shown."""
        ...


class SilentReporter:
    def start(self, description: str, total: int, completed: int) -> None:
        pass

    def advance(self, completed: int, **fields: float) -> None:
        pass

    def phase(self, text: str) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def warn(self, text: str) -> None:
        warnings.warn(text, UserWarning, stacklevel=3)  # library callers see where
