"""Networks by name: a `NetworkSpec` (stored as JSON next to the weights) rebuilds any denoiser."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from torch import nn

from disback_cli.errors import DisbackError, summary_of
from disback_cli.models.discrete_ddpm import DiscreteDDPMPrecond
from disback_cli.models.networks.layers import UNetBlock
from disback_cli.models.networks.mlp import MLP
from disback_cli.models.networks.unets import DhariwalUNet, SongUNet
from disback_cli.models.precond import EDMPrecond, VEPrecond, VPPrecond


def _image_network(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    """Adapt an EDM image network to the (data_shape, label_dim, **kwargs) constructor."""

    def build(data_shape: tuple[int, ...], label_dim: int = 0, **kwargs: Any) -> nn.Module:
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise DisbackError(f"{cls.__name__} needs square images (C, H, H), got {data_shape}")
        channels, resolution = data_shape[0], data_shape[1]
        return cls(
            img_resolution=resolution,
            in_channels=channels,
            out_channels=channels,
            label_dim=label_dim,
            **kwargs,
        )

    return build


# Raw networks F(x, c_noise, class_labels=None, **cond) by name, and the preconditionings that make
# them denoisers D(x, sigma, **cond). Both are the adapter point for model families that are not
# ours: see `register_architecture`.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "SongUNet": _image_network(SongUNet),
    "DhariwalUNet": _image_network(DhariwalUNet),
}
PRECONDITIONINGS: dict[str, Callable[..., nn.Module]] = {
    "edm": EDMPrecond,
    "vp": VPPrecond,
    "ve": VEPrecond,
    "ddpm": DiscreteDDPMPrecond,
}
# Conditions an architecture cannot run without (zeros of the right shapes), by name: the check
# that a spec's network runs (`meta_network`) passes them.
EXAMPLE_CONDITIONS: dict[str, Callable[[NetworkSpec, int], dict[str, torch.Tensor]]] = {}


def register_architecture(
    name: str,
    build: Callable[..., nn.Module],
    example_conditions: Callable[[NetworkSpec, int], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Make `name` a `NetworkSpec.arch`: `build(data_shape=..., label_dim=..., **arch_kwargs)`
    returns a raw network F(x, c_noise, class_labels=None, **cond); `example_conditions(spec, n)`
    gives the conditions it cannot run without (zeros of the right shapes), for checking that a
    spec's network runs.

    This is how a foreign model family plugs in: its adapter builds (or wraps) the foreign network
    behind that call, and a preconditioning (ours, or one given to `register_preconditioning`)
    turns it into a denoiser. Its teachers, path nodes and generators are then files like any
    other, a spec naming the adapter plus the weights, and every stage runs on them."""
    _register(ARCHITECTURES, "architecture", name, build)
    if example_conditions is not None:
        EXAMPLE_CONDITIONS[name] = example_conditions


def register_preconditioning(name: str, build: Callable[..., nn.Module]) -> None:
    """Make `name` a `NetworkSpec.precond`: `build(model, data_shape=..., label_dim=...,
    **precond_kwargs)` returns a denoiser, usually a `Precond` subclass giving the coefficients
    of the family's parameterisation (e.g. a discrete DDPM's epsilon or v prediction)."""
    _register(PRECONDITIONINGS, "preconditioning", name, build)


def _register(registry: dict, what: str, name: str, build: Callable[..., nn.Module]) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= 100 or name in registry:
        raise ValueError(f"{what} name {name!r} is taken or not a short string")
    registry[name] = build


# A spec arrives in files anyone may write, so its sizes are bounded before anything is built:
# a hostile `depth: 10**8` must be refused, not hang the process while it builds the network.
MAX_KWARG_INT = 1 << 16
MAX_COUNT = 256  # layers or blocks per resolution
COUNT_KWARGS = ("depth", "num_blocks", "layers_per_block")
MAX_LIST = 16
MAX_DIM = 1 << 14
MAX_SAMPLE_ELEMENTS = 1 << 26
MAX_LABELS = 100_000
MAX_PARAMETERS = 20 * 10**9


def _check_json_like(value: Any, where: str, depth: int = 0) -> None:
    """Constructor kwargs must be small JSON-like values: finite numbers, short lists and
    strings, shallow dicts."""
    if depth > 4:
        raise ValueError(f"{where}: nested too deeply")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > MAX_KWARG_INT:
            raise ValueError(f"{where}: {value} is out of range (|x| <= {MAX_KWARG_INT})")
    elif isinstance(value, float):
        if not math.isfinite(value) or abs(value) > 1e12:
            raise ValueError(f"{where}: {value} is not a finite number of sensible size")
    elif isinstance(value, str):
        if len(value) > 256:
            raise ValueError(f"{where}: string longer than 256 characters")
    elif isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST:
            raise ValueError(f"{where}: more than {MAX_LIST} items")
        for i, item in enumerate(value):
            _check_json_like(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        if len(value) > 64:
            raise ValueError(f"{where}: more than 64 keys")
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > 100:
                raise ValueError(f"{where}: keys must be short strings")
            _check_json_like(item, f"{where}.{key}", depth + 1)
    else:
        raise ValueError(f"{where}: unsupported value of type {type(value).__name__}")


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

    @model_validator(mode="after")
    def _bounded(self) -> NetworkSpec:
        if not 1 <= len(self.data_shape) <= 3 or not all(
            1 <= d <= MAX_DIM for d in self.data_shape
        ):
            raise ValueError(
                f"data_shape of {len(self.data_shape)} sizes {self.data_shape[:4]} is not 1 to "
                f"3 sizes in 1..{MAX_DIM}"
            )
        if math.prod(self.data_shape) > MAX_SAMPLE_ELEMENTS:
            raise ValueError(f"data_shape {self.data_shape} is too large for one sample")
        if not 0 <= self.label_dim <= MAX_LABELS:
            raise ValueError(f"label_dim {self.label_dim} is not in 0..{MAX_LABELS}")
        _check_json_like(self.arch_kwargs, "arch_kwargs")
        _check_json_like(self.precond_kwargs, "precond_kwargs")
        for key in COUNT_KWARGS:
            count = self.arch_kwargs.get(key)
            if isinstance(count, int) and not 0 <= count <= MAX_COUNT:
                raise ValueError(f"arch_kwargs.{key}: {count} is not in 0..{MAX_COUNT}")
        return self


def network_dropout(module: nn.Module) -> float:
    """The dropout probability the network's U-Net blocks use (0 for networks without them)."""
    rates = {block.dropout for block in module.modules() if isinstance(block, UNetBlock)}
    return max(rates, default=0.0)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate `module` without dropout, then restore the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def set_dropout(module: nn.Module, p: float | None) -> None:
    """Set the dropout probability of every U-Net block (None leaves the network's own)."""
    if p is None:
        return
    for block in module.modules():
        if isinstance(block, UNetBlock):
            block.dropout = p


def enable_checkpointing(module: nn.Module) -> None:
    """Recompute activations in the backward pass of every sub-network that supports it (the
    UNets of text-to-image teachers)."""
    found = [m for m in module.modules() if hasattr(m, "enable_gradient_checkpointing")]
    if not found:
        raise DisbackError("--gradient-checkpointing: this network does not support it")
    for m in found:
        m.enable_gradient_checkpointing()


def _construct(spec: NetworkSpec) -> nn.Module:
    try:
        model = ARCHITECTURES[spec.arch](
            data_shape=spec.data_shape, label_dim=spec.label_dim, **spec.arch_kwargs
        )
        return PRECONDITIONINGS[spec.precond](
            model, data_shape=spec.data_shape, label_dim=spec.label_dim, **spec.precond_kwargs
        )
    except DisbackError:
        raise
    except Exception as exc:  # the spec is data from a file: any failure is a bad spec
        first = summary_of(exc)
        raise DisbackError(
            f"network spec does not fit {spec.arch}/{spec.precond}: {first}"
        ) from exc


@functools.lru_cache(maxsize=16)
def _checked_template(spec_json: str) -> nn.Module:
    spec = NetworkSpec.model_validate_json(spec_json)
    with torch.device("meta"):
        network = _construct(spec).eval()
        count = sum(p.numel() for p in network.parameters())
        if count > MAX_PARAMETERS:
            raise DisbackError(
                f"network spec of {spec.arch} has {count:,} parameters, more than "
                f"{MAX_PARAMETERS:,}"
            )
        x = torch.zeros(2, *spec.data_shape)
        labels = torch.zeros(2, spec.label_dim) if spec.label_dim else None
        needed = EXAMPLE_CONDITIONS.get(spec.arch)
        cond = needed(spec, 2) if needed is not None else {}
        try:
            out = network(x, torch.ones(2), labels, **cond)
        except Exception as exc:  # bad kwargs show only when the network runs
            first = summary_of(exc)
            raise DisbackError(f"network spec of {spec.arch} does not run: {first}") from exc
    if out.shape != x.shape:
        raise DisbackError(f"network spec of {spec.arch} maps {x.shape} to {out.shape}")
    return network


def network_spec(data: object, where: str) -> NetworkSpec:
    """A network description read from a file as a `NetworkSpec`, or a one-line refusal."""
    try:
        return NetworkSpec.model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError: name the first broken bound
        raise DisbackError(f"{where}: bad network ({str(exc).splitlines()[-1].strip()})") from None


def meta_network(spec: NetworkSpec) -> nn.Module:
    """The network of `spec` on the meta device (no memory, no random draws), after checking
    that it is not absurdly large and that a forward pass runs and keeps the data's shape: a spec
    from a file must fail here, in one line, rather than in the middle of training. Cached;
    copy it before use."""
    return _checked_template(spec.model_dump_json())


def build_denoiser(spec: NetworkSpec) -> nn.Module:
    """A freshly initialised denoiser `D(x, sigma, **cond)` for `spec` (checked by
    `meta_network` first)."""
    meta_network(spec)
    return _construct(spec)
