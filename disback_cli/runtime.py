"""Run-time plumbing shared by the training commands: devices, progress reports, stop signals."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Protocol

import torch

from disback_cli.errors import ConfigError, DisbackError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if (
        device is None
        or device.type not in ("cpu", "cuda")
        or (device.type == "cpu" and device.index not in (None, 0))
    ):
        raise DisbackError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DisbackError(f"device {name!r} requested but CUDA is not available")
    return device


def physical_memory() -> int:
    """Bytes of RAM of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return physical_memory()


def check_fits_memory(what: str, nbytes: int, device: torch.device, hint: str = "") -> None:
    """Refuse, before anything is written, a size whose tensors alone exceed the memory of
    `device` (a typo such as `--batch 1000000000` must not end in an out-of-memory kill)."""
    total = device_memory(device)
    if nbytes > total:
        raise ConfigError(
            f"{what} needs {nbytes / 2**30:.1f} GiB for its tensors alone, more than the "
            f"{total / 2**30:.1f} GiB of {device.type}{hint}"
        )


def check_finite(
    iteration: int, directory, state, any_rank=lambda bad: bad, **values: torch.Tensor
) -> None:
    """Stop a run whose loss or gradient norm is NaN or infinite, before anything is saved.

    One device-to-host sync per call; the message names the run's latest resume point `state`
    (in `directory`), which stays intact; `any_rank` makes all processes of a data-parallel run
    stop together."""
    flags = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if not any_rank(not bool(torch.isfinite(flags).all())):
        return
    shown = ", ".join(f"{k} {v.item():.4g}" for k, v in values.items())
    last_good = (
        "no checkpoint had been saved yet"
        if state is None
        else f"last good checkpoint {directory / state.file} (iteration {state.step}) is intact"
    )
    raise DisbackError(
        f"diverged at iteration {iteration} ({shown}); nothing from it was saved; {last_good}; "
        "lower the learning rate or set --grad-clip and restart with --force"
    )


class Reporter(Protocol):
    """What a long loop tells its caller: the CLI shows a progress bar, tests may inject faults."""

    def start(self, description: str, total: int, completed: int) -> None: ...

    def advance(self, completed: int, **fields: float) -> None: ...

    def note(self, text: str) -> None: ...


class SilentReporter:
    def start(self, description: str, total: int, completed: int) -> None:
        pass

    def advance(self, completed: int, **fields: float) -> None:
        pass

    def note(self, text: str) -> None:
        pass


class StopFlag:
    """Set by SIGINT/SIGTERM; loops check it between iterations, save and exit cleanly."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: object) -> None:
        if flag.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        flag.signal_name = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
