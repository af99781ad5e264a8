"""The one-step generator G(z) = D(input_scale z, sigma_init), and G0, the one it starts from."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError
from torch import nn

from disback_cli.config import RecordConfig
from disback_cli.errors import ConfigError, DisbackError, describe_validation_error
from disback_cli.models.denoiser_files import DenoiserFile, load_denoiser
from disback_cli.models.family import Teacher
from disback_cli.models.networks import NetworkSpec, build_denoiser, network_spec
from disback_cli.runtime.sharding import WHOLE
from disback_cli.store.manifests import G0Spec


class OneStepGenerator(nn.Module):
    """G(z) = D(sigma_init * z, sigma_init), the initialisation of Diff-Instruct, SiD and DMD;
    with `input_scale` s, G(z) = D(s z, sigma_init): DMD2 feeds a discrete-time teacher pure
    noise as its input at a timestep, which is s = sqrt(1 + sigma^2) in EDM's coordinates."""

    def __init__(
        self, denoiser: nn.Module, sigma_init: float, input_scale: float | None = None
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = sigma_init
        self.input_scale = sigma_init if input_scale is None else input_scale

    def forward(self, z: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return self.denoiser(z * self.input_scale, self.sigma_init, **cond)


def g0_spec(cfg: RecordConfig, teacher: Teacher, student: DenoiserFile | None) -> G0Spec:
    """Where G0 comes from: the teacher (default), a student file, or a random student; for a
    teacher whose family feeds G0 its input otherwise (e.g. pure noise at a timestep)."""
    scale = teacher.family.g0_input_scale(cfg)
    if student is not None and student.info.get("input_scale") is not None:
        scale = student.info["input_scale"]  # a generator file trained with its own input scale
    if student is not None:
        return G0Spec(
            kind="file",
            sigma_init=cfg.sigma_init,
            input_scale=scale,
            file=str(Path(cfg.student).resolve()),
            sha256=student.sha256,
        )
    if cfg.student_arch_kwargs is not None:
        kwargs = {**teacher.spec.arch_kwargs, **cfg.student_arch_kwargs}
        try:
            network = NetworkSpec.model_validate(
                {**teacher.spec.model_dump(), "arch_kwargs": kwargs}
            )
        except ValidationError as exc:
            raise ConfigError(f"--student-arch-kwargs: {describe_validation_error(exc)}") from None
        return G0Spec(
            kind="random",
            sigma_init=cfg.sigma_init,
            input_scale=scale,
            network=network.model_dump(mode="json"),
            init_seed=cfg.seed,
        )
    return G0Spec(sigma_init=cfg.sigma_init, input_scale=scale)


def build_g0(
    spec: G0Spec,
    teacher: Teacher,
    device,
    verify: bool = True,
    share: bool = False,
    networks=WHOLE,
) -> tuple[OneStepGenerator, NetworkSpec]:
    """The frozen initial generator and its network spec (students may differ from the teacher).
    With `share`, a teacher-copy G0 runs on the teacher's own weights instead of a copy (both
    stay frozen: recording saves a whole network's memory); `networks` makes it whole or sharded
    (`runtime.sharding`)."""
    if spec.kind == "file":
        loaded = load_student(spec.file, teacher, device, spec.sha256, verify)
        if (loaded.spec.data_shape, loaded.spec.label_dim) != (
            teacher.spec.data_shape,
            teacher.spec.label_dim,
        ):
            raise DisbackError(
                f"{spec.file}: student data shape or classes differ from the teacher's"
            )
        denoiser, network = networks.adopt(loaded.denoiser), loaded.spec
    elif spec.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            network = network_spec(spec.network, "the trajectory's random student")
            denoiser = networks.adopt(build_denoiser(network).to(device))
    else:
        denoiser = teacher.denoiser if share else networks.copy(teacher.denoiser)
        network = teacher.spec
    g0 = OneStepGenerator(denoiser, spec.sigma_init, spec.input_scale)
    g0.eval().requires_grad_(False)
    return g0, network


def load_student(
    path: str,
    teacher: Teacher,
    device="cpu",
    expected_sha256: str | None = None,
    verify: bool = True,
) -> DenoiserFile:
    """A student network: a disback denoiser file, or what else the teacher's family reads as
    one (e.g. a diffusers UNet folder such as a distilled one-step UNet)."""
    return teacher.family.load_student(path, teacher, device, expected_sha256, verify)


def load_generator(
    path: Path, device: torch.device, expected_sha256: str | None = None, verify: bool = True
) -> tuple[OneStepGenerator, dict]:
    """A generator file's generator (eval mode) and its provenance, with its "file" and
    "sha256"."""
    generator, info, _ = load_generator_file(path, device, expected_sha256, verify)
    return generator, info


def load_generator_file(
    path: Path, device: torch.device, expected_sha256: str | None = None, verify: bool = True
) -> tuple[OneStepGenerator, dict, NetworkSpec]:
    """`load_generator`, and the network spec the file describes its denoiser with."""
    loaded = load_denoiser(path, device, expected_sha256, verify)
    if loaded.info.get("role") != "generator":
        raise DisbackError(f"{path}: not a generator file (role {loaded.info.get('role')!r})")
    generator = OneStepGenerator(
        loaded.denoiser, float(loaded.info["sigma_init"]), loaded.info.get("input_scale")
    )
    info = {**loaded.info, "sha256": loaded.sha256, "file": str(Path(path).absolute())}
    return generator.eval(), info, loaded.spec
