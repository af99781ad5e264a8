"""Density-ratio networks (DiffRatio): d(x_t, sigma) ~ log p_data,sigma(x_t) / q_G,sigma(x_t).

A noise-level-conditioned classifier whose logit, trained to tell noised data (label 1) from
noised generator samples (label 0), converges to the log density ratio of the two noised
distributions. Far smaller than a score network: an MLP for vectors, a shallow strided conv
encoder for images. The input is scaled to unit variance at every sigma (EDM's c_in) and sigma
enters as Fourier features of ln(sigma) / 4 (EDM's c_noise). Files: `disback.ratio`
safetensors with the spec in the metadata.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import atomic_write_chunks, parse_json
from disback_cli.store.tensorfile import (
    load_weights,
    read_safetensors,
    safetensors_chunks,
    tensors_of,
)

FORMAT = "disback.ratio"
FORMAT_VERSION = 1
Width = Annotated[int, Field(ge=1, le=4096)]


class RatioSpec(BaseModel):
    """Everything needed to rebuild a ratio network before loading its weights strictly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # fmt: off
    arch: Literal["mlp", "conv"]            # mlp for vectors, conv for images
    data_shape: tuple[Annotated[int, Field(ge=1, le=4096)], ...]  # one sample's shape
    label_dim: Annotated[int, Field(ge=0, le=100_000)] = 0  # classes the ratio is conditioned on
    sigma_data: Annotated[float, Field(gt=0, le=1e3)] = 0.5  # data scale, for the input scaling
    width: Width = 64                       # mlp: hidden units; conv: channels of the first layer
    depth: Annotated[int, Field(ge=1, le=16)] = 3  # mlp: hidden layers; conv: strided layers
    # fmt: on


def _groups(channels: int) -> int:
    """GroupNorm's groups: the largest divisor of `channels` up to 8 (any width builds)."""
    return max(g for g in range(1, 9) if channels % g == 0)


def _fourier(log_sigma: torch.Tensor, features: int) -> torch.Tensor:
    frequencies = torch.arange(1, features // 2 + 1, device=log_sigma.device, dtype=torch.float32)
    angles = log_sigma.float().reshape(-1, 1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class RatioNetwork(nn.Module):
    """d(x, sigma, class_labels) -> one logit per sample."""

    noise_features = 16

    def __init__(self, spec: RatioSpec) -> None:
        super().__init__()
        self.spec, self.data_shape, self.label_dim = spec, spec.data_shape, spec.label_dim
        extra = self.noise_features + spec.label_dim
        if spec.arch == "mlp":
            width, size = spec.width, math.prod(spec.data_shape)
            layers: list[nn.Module] = [nn.Linear(size + extra, width), nn.SiLU()]
            for _ in range(spec.depth - 1):
                layers += [nn.Linear(width, width), nn.SiLU()]
            self.body = nn.Sequential(*layers)
            self.out = nn.Linear(width, 1)
        else:
            if len(spec.data_shape) != 3:
                raise DisbackError("a conv ratio network needs images (C, H, W)")
            channels, layers, width = spec.data_shape[0], [], spec.width
            self.embed = nn.Linear(extra, width)
            self.stem = nn.Conv2d(channels, width, 3, padding=1)
            for i in range(spec.depth):  # width x 2, 4, 8, 8, ...
                wide = spec.width * 2 ** min(i + 1, 3)
                layers += [
                    nn.GroupNorm(_groups(width), width),
                    nn.SiLU(),
                    nn.Conv2d(width, wide, 3, stride=2, padding=1),
                ]
                width = wide
            self.body = nn.Sequential(*layers)
            self.out = nn.Linear(width, 1)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(len(x)) if len(sigma) == 1 else sigma
        scale = (self.spec.sigma_data**2 + sigma**2).rsqrt().reshape(-1, *[1] * (x.ndim - 1))
        extra = [_fourier(sigma.log() / 4, self.noise_features)]
        if self.spec.label_dim:
            if class_labels is None:
                class_labels = torch.zeros(len(x), self.spec.label_dim, device=x.device)
            extra.append(class_labels.float().reshape(len(x), -1))
        extra = torch.cat(extra, dim=1)
        if self.spec.arch == "mlp":
            return self.out(self.body(torch.cat([(x * scale).flatten(1), extra], dim=1))).flatten()
        h = self.stem(x * scale) + self.embed(extra)[:, :, None, None]
        return self.out(self.body(h).mean(dim=(2, 3))).flatten()


def ratio_spec_for(
    data_shape: tuple[int, ...],
    label_dim: int,
    sigma_data: float,
    width: int | None,
    depth: int | None,
) -> RatioSpec:
    """The default ratio network for a teacher's data: an MLP of 3 x 64 for vectors, a conv
    encoder of 16 -> 32 -> 64 -> 128 channels for images (ours; the paper's sizes were not
    available to us)."""
    image = len(data_shape) == 3
    return RatioSpec(
        arch="conv" if image else "mlp",
        data_shape=data_shape,
        label_dim=label_dim,
        sigma_data=sigma_data,
        width=width or (16 if image else 64),
        depth=depth or 3,
    )


MAX_PARAMETERS = 10**8  # a ratio network is meant to be small


def build_ratio(spec: RatioSpec, source: str = "ratio network", seed: int = 0) -> RatioNetwork:
    """A network of `spec` initialised from `seed` (counted on the meta device first, so a spec
    from a file cannot ask for an absurd one); the global random stream is left as it was, and
    every process of a torchrun launch builds the same network."""
    with torch.device("meta"):
        count = sum(p.numel() for p in RatioNetwork(spec).parameters())
    if count > MAX_PARAMETERS:
        raise DisbackError(f"{source}: a ratio network of {count:,} parameters is too large")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RatioNetwork(spec)


def save_ratio(path: Path, network: RatioNetwork, info: dict) -> str:
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "network": network.spec.model_dump_json(),
        "info": json.dumps(info),
    }
    return atomic_write_chunks(path, *safetensors_chunks(tensors_of(network), metadata))


def load_ratio(
    path: Path, device, expected_sha256: str | None = None, verify: bool = True
) -> tuple[RatioNetwork, dict]:
    """A ratio network file, checked (format, spec bounds, strict names and shapes, finite)."""
    tensors, metadata, _ = read_safetensors(path, expected_sha256, verify)
    if metadata.get("format") != FORMAT or metadata.get("format_version") != str(FORMAT_VERSION):
        raise DisbackError(f"{path}: not a disback ratio network file")
    try:
        spec = RatioSpec.model_validate(parse_json(metadata["network"]))
        info = parse_json(metadata.get("info", "{}"))
    except (KeyError, ValueError, ValidationError):
        raise DisbackError(f"{path}: bad ratio network metadata") from None
    network = build_ratio(spec, str(path))
    load_weights(network, tensors, str(path))
    return network.to(device).eval().requires_grad_(False), info
