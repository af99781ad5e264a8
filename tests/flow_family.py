"""A third teacher family, written the way a user would add one: rectified-flow (flow-matching)
teachers, stored in a format of their own, plug into disback through this module alone.

A rectified flow moves x_t = (1 - t) x0 + t n and its network predicts the velocity v = n - x0
from (x_t, t). In EDM's coordinates x = x0 + sigma n with sigma = t / (1 - t), so x_t = x / (1 +
sigma), t = sigma / (1 + sigma), and the denoiser is x0_hat = x_t - t v: D(x, sigma) = c_skip x +
c_out F(c_in x, c_noise) with c_in = c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma) and
c_noise = t. Its training loss is the velocity MSE, |x0_hat - x0|^2 / t^2.

A teacher is a folder holding `flow.json` (`dim`, `hidden`, `depth`, and optionally the data set
it learned) and `velocity.safetensors` (the velocity MLP's weights under their own names). The
family reads it, builds our denoiser from it, and names it by the sha256 of both files; every
stage then runs on it. Registering it is one line: `register_family(FlowFamily)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.conditioning import condition_source
from disback_cli.models.denoiser_files import build_with_weights
from disback_cli.models.family import EDM_DEFAULT_SIGMA, Teacher, TeacherFamily
from disback_cli.models.networks import (
    PRECONDITIONINGS,
    NetworkSpec,
    register_preconditioning,
)
from disback_cli.models.precond import Precond
from disback_cli.store.component_files import read_config
from disback_cli.store.fileio import sha256_bytes
from disback_cli.store.tensorfile import read_safetensors

PRECOND = "test.rectified_flow"
CONFIG, WEIGHTS = "flow.json", "velocity.safetensors"


class RectifiedFlowPrecond(Precond):
    """A velocity network as an EDM denoiser (see the module docstring)."""

    sigma_data = 1.0  # rectified flows interpolate data and unit noise

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        t = sigma / (1 + sigma)
        return 1 / (1 + sigma), -t, 1 / (1 + sigma), t

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """The velocity MSE in denoiser space: 1 / t^2."""
        return ((1 + sigma) / sigma) ** 2


if PRECOND not in PRECONDITIONINGS:
    register_preconditioning(PRECOND, RectifiedFlowPrecond)


def flow_spec(dim: int, hidden: int, depth: int) -> NetworkSpec:
    kwargs = {"hidden": hidden, "depth": depth}
    return NetworkSpec(arch="mlp", arch_kwargs=kwargs, precond=PRECOND, data_shape=(dim,))


class FlowFamily(TeacherFamily):
    """Rectified-flow teachers in their own folder format; the rest is `TeacherFamily`'s."""

    description = "rectified-flow teachers (a folder with flow.json)"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir() and (path / CONFIG).is_file()

    @classmethod
    def open(cls, source, path, device, expected_sha256, recorded_in) -> Teacher:
        config = read_config(path / CONFIG, "flow config")
        tensors, _, weights_sha = read_safetensors(path / WEIGHTS)
        listing = {CONFIG: sha256_bytes((path / CONFIG).read_bytes()), WEIGHTS: weights_sha}
        digest = sha256_bytes(json.dumps(listing, sort_keys=True).encode())
        if expected_sha256 is not None and digest != expected_sha256:
            raise DisbackError(f"teacher {source} is not the one {recorded_in} was recorded with")
        spec = flow_spec(config["dim"], config["hidden"], config["depth"])
        weights = {f"model.{name}": tensor for name, tensor in tensors.items()}
        denoiser = build_with_weights(spec, weights, str(path / WEIGHTS))
        return Teacher(
            denoiser=denoiser.to(device).eval().requires_grad_(False),
            spec=spec,
            source=source,
            sha256=digest,
            dataset=config.get("dataset"),
            train_sigma=EDM_DEFAULT_SIGMA,
            info={"role": "teacher", "flow": {"hidden": config["hidden"]}},
            family=cls(),
            conditions=condition_source(0),
        )

    def format_name(self, teacher: Teacher) -> str:
        return "rectified-flow folder"


def write_flow_teacher(folder: Path, velocity: nn.Module, config: dict) -> Path:
    """A teacher folder: the config and the velocity network's weights, as its trainer wrote."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / CONFIG).write_text(json.dumps(config))
    state = {k: v.detach().contiguous() for k, v in velocity.state_dict().items()}
    save_file(state, str(folder / WEIGHTS))
    return folder
