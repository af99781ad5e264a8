"""Teachers by source: `builtin:NAME`, a disback denoiser file (.safetensors), an EDM .pkl, or a
Stable Diffusion model folder in the diffusers layout.

The registry of teacher families: the first family that claims a source opens it, and that family
object travels with the teacher (`Teacher.family`). Generator files name their family the same
way, by what they record.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from disback_cli.models.denoiser_family import DenoiserFileFamily
from disback_cli.models.family import (
    BUILTIN_PREFIX,
    BUILTIN_TEACHERS,
    Teacher,
    TeacherFamily,
    builtin_path,
    teacher_location,
)
from disback_cli.models.text_to_image.family import DiffusersFamily

__all__ = [
    "BUILTIN_PREFIX",
    "BUILTIN_TEACHERS",
    "Teacher",
    "builtin_path",
    "teacher_location",
]

# Asked in order; the last takes every file no other family claims.
TEACHER_FAMILIES: list[type[TeacherFamily]] = [DiffusersFamily, DenoiserFileFamily]


def register_family(family: type[TeacherFamily]) -> None:
    """Add a teacher family, asked before the built-in ones (see `models.family`)."""
    if family in TEACHER_FAMILIES:
        raise ValueError(f"{family.__name__} is registered already")
    TEACHER_FAMILIES.insert(0, family)


def open_teacher(
    source: str,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
    recorded_in: Any = None,
) -> Teacher:
    """A frozen teacher denoiser `D(x, sigma, **cond)` in eval mode, with its provenance and its
    family. With `expected_sha256` (a teacher named by the trajectory `recorded_in`) the files are
    hashed before any of them is parsed."""
    path = teacher_location(source)
    family = next(f for f in TEACHER_FAMILIES if f.claims(path))
    return family.open(source, path, device, expected_sha256, recorded_in)


def load_teacher(source: str, device: str | torch.device = "cpu") -> nn.Module:
    """The teacher as a frozen module: `forward(x, sigma, **cond)` -> denoised x."""
    return open_teacher(source, device).denoiser


def generator_family_of(info: dict) -> type[TeacherFamily]:
    """The family a generator file with this provenance (`info`) was trained from."""
    return next(f for f in TEACHER_FAMILIES if f.claims_generator(info))


def generator_family(
    info: dict, device, verify: bool = True, model_folder: str | None = None
) -> TeacherFamily:
    """The family that samples a generator file with this provenance (`info`)."""
    return generator_family_of(info).for_generator(info, device, verify, model_folder)


def describe_teacher(teacher: Teacher) -> dict[str, Any]:
    """What `disback teacher inspect` reports."""
    spec = teacher.spec
    image = len(spec.data_shape) == 3
    return {
        "source": teacher.source,
        "sha256": teacher.sha256,
        "format": teacher.family.format_name(teacher),
        "architecture": spec.arch,
        "preconditioning": spec.precond,
        "resolution": spec.data_shape[1] if image else None,
        "channels": spec.data_shape[0] if image else None,
        "data_shape": list(spec.data_shape),
        "label_dim": spec.label_dim,
        "parameters": teacher.parameter_count,
        "use_fp16": bool(spec.precond_kwargs.get("use_fp16", False)),
        "dropout": spec.arch_kwargs.get("dropout"),
        "augment_dim": spec.arch_kwargs.get("augment_dim", 0),
        "dataset": teacher.dataset,
        "edm": teacher.info.get("edm"),
    }
