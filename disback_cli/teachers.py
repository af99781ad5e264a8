"""Teachers by spec: `builtin:NAME` or a disback teacher file (.safetensors)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from disback_cli.checkpoint import load_denoiser
from disback_cli.errors import DisbackError
from disback_cli.networks import NetworkSpec

BUILTIN_PREFIX = "builtin:"
BUILTIN_TEACHERS = {"ring2d": "2-D ring of 8 Gaussians (MLP denoiser, 35k parameters)"}
EDM_DEFAULT_SIGMA = {"p_mean": -1.2, "p_std": 1.2}


@dataclass
class Teacher:
    denoiser: nn.Module
    spec: NetworkSpec
    source: str  # what the user passed, e.g. "builtin:ring2d"
    sha256: str
    dataset: str | None  # ground-truth data set name, if known
    train_sigma: dict[str, float]  # log-normal noise levels it was trained with


def builtin_path(name: str) -> Path:
    if name not in BUILTIN_TEACHERS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_TEACHERS)
        raise DisbackError(f"unknown built-in teacher {BUILTIN_PREFIX}{name} (known: {known})")
    return Path(str(resources.files("disback_cli") / "builtin" / f"{name}.safetensors"))


def resolve_teacher_path(spec: str) -> Path:
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_path(spec[len(BUILTIN_PREFIX) :])
    path = Path(spec)
    if path.suffix == ".pkl":
        raise DisbackError(
            f"{spec}: EDM network pickles are not supported yet; use a .safetensors teacher"
        )
    return path


def load_teacher(spec: str, device: str | torch.device = "cpu") -> Teacher:
    """Load a frozen teacher denoiser `D(x, sigma, class_labels)` in eval mode."""
    loaded = load_denoiser(resolve_teacher_path(spec), device)
    return Teacher(
        denoiser=loaded.denoiser,
        spec=loaded.spec,
        source=spec,
        sha256=loaded.sha256,
        dataset=loaded.info.get("dataset"),
        train_sigma=loaded.info.get("train_sigma", EDM_DEFAULT_SIGMA),
    )
