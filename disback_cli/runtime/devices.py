"""Devices and their memory: which device a name means, and sizes refused before they are tried."""

from __future__ import annotations

import torch

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.store import fileio


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
        raise ConfigError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DisbackError(f"device {name!r} requested but CUDA is not available")
    return device


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return fileio.physical_memory()


def check_fits_memory(what: str, nbytes: int, device: torch.device, hint: str = "") -> None:
    """Refuse, before anything is written, a size whose tensors alone exceed the memory of
    `device` (a typo such as `--batch 1000000000` must not end in an out-of-memory kill)."""
    total = device_memory(device)
    if nbytes > total:
        raise ConfigError(
            f"{what} needs {nbytes / 2**30:.1f} GiB for its tensors alone, more than the "
            f"{total / 2**30:.1f} GiB of {device.type}{hint}"
        )


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory tensors have held on a GPU since the process started (GiB), for the
    logs; None on the CPU, whose process memory is not the tensors' alone."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30
