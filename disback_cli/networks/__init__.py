"""Networks by name: a `NetworkSpec` (stored as JSON next to the weights) rebuilds any denoiser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.networks.layers import UNetBlock
from disback_cli.networks.mlp import MLP
from disback_cli.networks.unets import DhariwalUNet, SongUNet
from disback_cli.precond import EDMPrecond, VEPrecond, VPPrecond


def _image_network(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    """Adapt an EDM image network to the (data_shape, label_dim, **kwargs) constructor."""

    def build(data_shape: tuple[int, ...], label_dim: int = 0, **kwargs: Any) -> nn.Module:
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise DisbackError(f"{cls.__name__} needs square images (C, H, H), got {data_shape}")
        channels, resolution = data_shape[0], data_shape[1]
        return cls(img_resolution=resolution, in_channels=channels, out_channels=channels,
                   label_dim=label_dim, **kwargs)  # fmt: skip

    return build


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "SongUNet": _image_network(SongUNet),
    "DhariwalUNet": _image_network(DhariwalUNet),
}
PRECONDITIONINGS: dict[str, Callable[..., nn.Module]] = {
    "edm": EDMPrecond,
    "vp": VPPrecond,
    "ve": VEPrecond,
}


class NetworkSpec(BaseModel):
    """Everything needed to rebuild a denoiser before loading its weights strictly."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # fmt: off
    arch: str                               # Key of ARCHITECTURES.
    arch_kwargs: dict[str, Any] = {}        # Constructor kwargs of the raw network.
    precond: str = "edm"                    # Key of PRECONDITIONINGS.
    precond_kwargs: dict[str, Any] = {}     # e.g. sigma_data, sigma_min, sigma_max, use_fp16.
    data_shape: tuple[int, ...]             # Shape of one sample, (C, H, W) for images.
    label_dim: int = 0                      # Number of classes, 0 = unconditional.
    # fmt: on

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


def set_dropout(module: nn.Module, p: float | None) -> None:
    """Set the dropout probability of every U-Net block (None leaves the network's own)."""
    if p is None:
        return
    for block in module.modules():
        if isinstance(block, UNetBlock):
            block.dropout = p


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
