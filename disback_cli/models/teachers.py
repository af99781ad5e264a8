"""Teachers by spec: `builtin:NAME`, a disback teacher file (.safetensors), an EDM .pkl, or a
Stable Diffusion model folder in the diffusers layout."""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.models.conditioning import ConditionSource, condition_source
from disback_cli.models.denoiser_files import build_with_weights, load_denoiser
from disback_cli.models.edm_pickle import read_edm_pickle
from disback_cli.models.networks import NetworkSpec
from disback_cli.models.text_to_image.folder import (
    DiffusersFolder,
    is_diffusers_folder,
    read_folder,
    unet_tensors,
)
from disback_cli.store.fileio import hash_regular_file
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES, read_safetensors

BUILTIN_PREFIX = "builtin:"
BUILTIN_TEACHERS = {
    "ring2d": "2-D ring of 8 Gaussians (MLP denoiser, 35k parameters)",
    "digits": "8x8 handwritten digits, class-conditional (small SongUNet, EDM preconditioning)",
    "shapes": "16x16 procedural shapes, 64 modes in 16 classes (small SongUNet, EDM precond.)",
}
EDM_DEFAULT_SIGMA = {"p_mean": -1.2, "p_std": 1.2}
MAX_TEACHER_BYTES = MAX_SAFETENSORS_BYTES  # EDM pickles are smaller than their safetensors


@dataclass
class Teacher:
    denoiser: nn.Module
    spec: NetworkSpec
    source: str  # what the user passed, e.g. "builtin:ring2d"
    sha256: str  # of the file it was read from
    dataset: str | None  # ground-truth data set name, if known
    train_sigma: dict[str, float]  # log-normal noise levels it was trained with
    info: dict[str, Any]  # provenance from the file (role, EDM class, ...)
    folder: DiffusersFolder | None = None  # text-to-image teachers: their model folder
    prompt_source: ConditionSource | None = None  # text-to-image teachers: the training prompts

    @property
    def text_to_image(self) -> bool:
        return self.folder is not None

    @property
    def conditions(self) -> ConditionSource:
        """What the teacher is conditioned on during training: its classes, if any, or the
        prompts given to a text-to-image teacher (`with_prompts`)."""
        if self.prompt_source is not None:
            return self.prompt_source
        if self.text_to_image:
            raise ConfigError("a text-to-image teacher needs --prompts FILE")
        return condition_source(self.spec.label_dim)

    def with_prompts(self, source: ConditionSource) -> Teacher:
        return replace(self, prompt_source=source)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.denoiser.parameters())


def builtin_path(name: str) -> Path:
    if name not in BUILTIN_TEACHERS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_TEACHERS)
        raise DisbackError(f"unknown built-in teacher {BUILTIN_PREFIX}{name} (known: {known})")
    return Path(str(resources.files("disback_cli") / "builtin" / f"{name}.safetensors"))


def resolve_teacher_path(spec: str) -> Path:
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_path(spec[len(BUILTIN_PREFIX) :])
    return Path(spec)


def load_teacher(spec: str, device: str | torch.device = "cpu") -> nn.Module:
    """The teacher as a frozen module: `forward(x, sigma, **cond)` -> denoised x."""
    return open_teacher(spec, device).denoiser


def open_teacher(
    spec: str,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
    recorded_in: str | Path | None = None,
) -> Teacher:
    """A frozen teacher denoiser `D(x, sigma, **cond)` in eval mode, with its provenance.

    EDM pickles are read with a restricted unpickler (no code from the file runs) into our own
    network implementation, loaded strictly. With `expected_sha256` (a teacher named by the
    trajectory `recorded_in`) the file is hashed before any of it is parsed.
    """
    path = resolve_teacher_path(spec)
    if is_diffusers_folder(path):
        return _open_folder(spec, path, device, expected_sha256, recorded_in)
    if expected_sha256 is not None:
        digest = hash_regular_file(path, MAX_TEACHER_BYTES, "teacher")
        if digest != expected_sha256:
            raise DisbackError(
                f"teacher {spec} is not the one {recorded_in} was recorded with (sha256 differs)"
            )
    if path.suffix == ".pkl":
        edm = read_edm_pickle(path)
        denoiser = build_with_weights(edm.spec, edm.state_dict, str(path))
        info = {
            "role": "teacher",
            "edm": {
                "class_name": edm.class_name,
                "model_type": edm.model_type,
                "module_src_sha256": edm.module_src_sha256,
            },
        }
        return Teacher(
            denoiser.to(device).eval().requires_grad_(False),
            edm.spec,
            spec,
            edm.sha256,
            None,
            EDM_DEFAULT_SIGMA,
            info,
        )
    loaded = load_denoiser(path, device)
    return Teacher(
        denoiser=loaded.denoiser,
        spec=loaded.spec,
        source=spec,
        sha256=loaded.sha256,
        dataset=loaded.info.get("dataset"),
        train_sigma=loaded.info.get("train_sigma") or EDM_DEFAULT_SIGMA,
        info=loaded.info,
    )


def _open_folder(spec: str, path: Path, device, expected_sha256, recorded_in) -> Teacher:
    """A diffusers model folder's UNet as a frozen denoiser; the text encoders and the VAE are
    loaded where they are needed (`text_to_image.text`, `text_to_image.vae`)."""
    folder = read_folder(path)
    if expected_sha256 is not None and folder.digest() != expected_sha256:
        raise DisbackError(
            f"teacher {spec} is not the one {recorded_in} was recorded with (sha256 differs)"
        )
    weights = folder.weights["unet"]
    tensors, _, digest = read_safetensors(weights)
    rel = str(weights.relative_to(folder.root))
    if folder.files.setdefault(rel, digest) != digest:
        raise DisbackError(f"{weights}: changed while being read")
    network = folder.spec()
    denoiser = build_with_weights(network, unet_tensors(tensors), str(weights))
    info = {"role": "teacher", "text_to_image": {"pipeline": folder.pipeline, "xl": folder.xl}}
    return Teacher(
        denoiser.to(device).eval().requires_grad_(False),
        network,
        spec,
        folder.digest(),
        None,
        EDM_DEFAULT_SIGMA,
        info,
        folder,
    )


def describe_teacher(teacher: Teacher) -> dict[str, Any]:
    """What `disback teacher inspect` reports."""
    spec = teacher.spec
    image = len(spec.data_shape) == 3
    return {
        "source": teacher.source,
        "sha256": teacher.sha256,
        "format": "edm-pickle"
        if teacher.source.endswith(".pkl")
        else "diffusers"
        if teacher.text_to_image
        else "disback",
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
