"""Networks by name: a `NetworkSpec` (stored as JSON next to the weights) rebuilds any denoiser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.networks.mlp import MLP
from disback_cli.precond import EDMPrecond

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP}
PRECONDITIONINGS: dict[str, Callable[..., nn.Module]] = {"edm": EDMPrecond}


class NetworkSpec(BaseModel):
    """Everything needed to rebuild a denoiser before loading its weights strictly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str  # Key of ARCHITECTURES.
    arch_kwargs: dict[str, Any] = {}  # Constructor kwargs of the raw network.
    precond: str = "edm"  # Key of PRECONDITIONINGS.
    precond_kwargs: dict[str, float] = {}  # e.g. sigma_data, sigma_min, sigma_max.
    data_shape: tuple[int, ...]  # Shape of one sample.
    label_dim: int = 0  # Number of classes, 0 = unconditional.

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r} (known: {sorted(ARCHITECTURES)})")
        return value

    @field_validator("precond")
    @classmethod
    def _known_precond(cls, value: str) -> str:
        if value not in PRECONDITIONINGS:
            raise ValueError(
                f"unknown preconditioning {value!r} (known: {sorted(PRECONDITIONINGS)})"
            )
        return value


def build_denoiser(spec: NetworkSpec) -> nn.Module:
    """A freshly initialised denoiser `D(x, sigma, class_labels)` for `spec`."""
    try:
        model = ARCHITECTURES[spec.arch](
            data_shape=spec.data_shape, label_dim=spec.label_dim, **spec.arch_kwargs
        )
        return PRECONDITIONINGS[spec.precond](
            model, data_shape=spec.data_shape, label_dim=spec.label_dim, **spec.precond_kwargs
        )
    except TypeError as exc:
        raise DisbackError(f"network spec does not fit {spec.arch}/{spec.precond}: {exc}") from exc
