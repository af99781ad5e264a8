"""Denoiser files: safetensors weights with the network spec and provenance in the metadata.

Used for teachers, path nodes and generators alike, so any of them can be loaded anywhere a
denoiser is expected. Reading hashes the exact bytes it parses.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from disback_cli.errors import DisbackError, describe_validation_error
from disback_cli.models.networks import NetworkSpec, meta_network
from disback_cli.store.fileio import atomic_write_chunks, parse_json
from disback_cli.store.tensorfile import (
    check_weights,
    read_safetensors,
    safetensors_chunks,
)

FORMAT = "disback.denoiser"
FORMAT_VERSION = 1


class DenoiserInfo(BaseModel):
    """Provenance in a denoiser file's metadata. Files come from anyone, so every value disback
    uses is typed, finite and bounded here; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: str | None = Field(None, max_length=50)
    dataset: str | None = Field(None, max_length=100)
    train_sigma: dict[Literal["p_mean", "p_std"], Annotated[float, Field(ge=-20, le=20)]] | None = (
        None
    )
    sigma_init: Annotated[float, Field(gt=0, le=1e4)] | None = None
    input_scale: Annotated[float, Field(gt=0, le=1e4)] | None = None
    step: Annotated[int, Field(ge=0, le=1 << 40)] | None = None
    index: Annotated[int, Field(ge=0, le=100_000)] | None = None
    weights: str | None = Field(None, max_length=50)
    teacher_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _generator_has_sigma(self) -> DenoiserInfo:
        if self.role == "generator" and self.sigma_init is None:
            raise ValueError("a generator file needs sigma_init")
        if self.train_sigma is not None and (
            set(self.train_sigma) != {"p_mean", "p_std"} or self.train_sigma["p_std"] <= 0
        ):
            raise ValueError("train_sigma needs p_mean and a positive p_std")
        return self


@dataclass
class DenoiserFile:
    denoiser: nn.Module
    spec: NetworkSpec
    info: dict[str, Any]  # validated by DenoiserInfo
    sha256: str


def save_denoiser(
    path: str | Path,
    denoiser: nn.Module | Mapping[str, torch.Tensor],
    spec: NetworkSpec,
    info: dict,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the denoiser's weights (a module, or its state dict, possibly of sharded tensors
    gathered one at a time) atomically, floating tensors cast to `dtype` if given; return the
    file's sha256."""
    return atomic_write_chunks(path, *denoiser_file_chunks(denoiser, spec, info, dtype))


def denoiser_file_chunks(
    denoiser: nn.Module | Mapping[str, torch.Tensor],
    spec: NetworkSpec,
    info: dict,
    dtype: torch.dtype | None = None,
):
    """A denoiser file as (size, chunks) for an atomic writer (see `save_denoiser`)."""
    state = denoiser.state_dict() if isinstance(denoiser, nn.Module) else denoiser
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "network": spec.model_dump_json(),
        "info": json.dumps(info, sort_keys=True),
    }
    return safetensors_chunks(state, metadata, dtype)


def load_denoiser(
    path: str | Path,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
    verify: bool = True,
) -> DenoiserFile:
    """Rebuild a denoiser from a disback denoiser file and load its weights strictly
    (checked against `expected_sha256` unless `verify` is off; see `read_safetensors`)."""
    tensors, metadata, digest = read_safetensors(path, expected_sha256, verify)
    if metadata.get("format") != FORMAT:
        raise DisbackError(f"{path}: not a disback denoiser file (metadata 'format' missing)")
    version = metadata.get("format_version", "0")
    if not (version.isdigit() and len(version) < 6) or int(version) < 1:
        raise DisbackError(f"{path}: unknown denoiser format version {version!r:.20}")
    if int(version) > FORMAT_VERSION:
        raise DisbackError(
            f"{path}: denoiser format version {version} is newer than this disback "
            f"understands ({FORMAT_VERSION}); upgrade disback"
        )
    try:
        spec = NetworkSpec.model_validate(parse_json(metadata["network"]))
    except (KeyError, ValueError, ValidationError) as exc:
        raise DisbackError(f"{path}: bad network metadata ({_first_error(exc)})") from None
    try:
        info = DenoiserInfo.model_validate(parse_json(metadata.get("info", "{}")))
    except (ValueError, ValidationError) as exc:
        raise DisbackError(f"{path}: bad info metadata ({_first_error(exc)})") from None
    denoiser = build_with_weights(spec, tensors, str(path))
    sha256 = digest or expected_sha256 or ""
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    return DenoiserFile(denoiser, spec, info.model_dump(exclude_none=True), sha256)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return describe_validation_error(exc).removeprefix("invalid configuration: ")
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__


def build_with_weights(spec: NetworkSpec, tensors: dict[str, torch.Tensor], source: str):
    """The network of `spec` holding exactly `tensors` (as float32), loaded strictly.

    Built on the meta device: no initialisation compute and no draws from the global random
    stream, so loading a network mid-run does not shift dropout noise. Files may hold bf16
    (`record --node-dtype bf16`) or fp16 (EDM pickles); computation uses float32 weights."""
    try:
        denoiser = copy.deepcopy(meta_network(spec))  # building is slow, copying is not
    except DisbackError as exc:
        raise DisbackError(f"{source}: {exc}") from None
    check_weights(denoiser.state_dict(), tensors, source)  # before any tensor is converted
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    denoiser.load_state_dict(tensors, strict=True, assign=True)
    return denoiser
