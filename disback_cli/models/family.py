"""Teachers and their families: what differs between kinds of teacher lives in one object.

A teacher family knows how to recognise and open its teachers and everything that follows from
what they are: which conditions they take and how they are drawn, the defaults that fit their size
and the settings they refuse, how G0 reads its input, guidance of the target, whether path nodes
are full weights or adapters, what a generator file records, and how samples are conditioned and
decoded. The stages ask the teacher's family and never which family it is.

`TeacherFamily` is also the behaviour every family starts from: a network whose file holds its
weights, conditioned on class labels (or nothing), trained at EDM's noise levels, with full-weight
path nodes and samples in data space. `models.teachers` keeps the registry of families.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from disback_cli.config.teacher_kinds import BUILTIN_PREFIX, BUILTIN_TEACHERS, SIZE_DEFAULTS
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.models.conditioning import Conditioning, ConditionSource, condition_source
from disback_cli.models.denoiser_files import DenoiserFile, load_denoiser
from disback_cli.models.discrete_ddpm import DiscreteSigma
from disback_cli.models.networks import NetworkSpec
from disback_cli.models.path_nodes import FULL_WEIGHTS, NodeFormat
from disback_cli.models.trained_weights import ALL_WEIGHTS, AllWeights
from disback_cli.runtime.sharding import blocks_of
from disback_cli.store.manifests import PromptsRef, TeacherRef

EDM_DEFAULT_SIGMA = {"p_mean": -1.2, "p_std": 1.2}
EDM_SIZE_PARAMETERS = 10_000_000  # the smallest released EDM teacher has 56 M
DEFAULT_SIGMA_INIT = 2.5  # SiD's init_sigma


@dataclass
class Teacher:
    """A frozen teacher denoiser `D(x, sigma, **cond)` in eval mode, with its provenance."""

    denoiser: nn.Module | None  # None once its weights were handed over (path nodes, diffratio)
    spec: NetworkSpec
    source: str  # what the user passed, e.g. "builtin:ring2d"
    sha256: str  # of the file (or the files) it was read from
    dataset: str | None  # ground-truth data set name, if known
    train_sigma: dict[str, float]  # log-normal noise levels it was trained with
    info: dict[str, Any]  # provenance from the file (role, EDM class, ...)
    family: TeacherFamily
    conditions: ConditionSource  # what training batches are conditioned on

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.denoiser.parameters())

    def with_conditions(self, conditions: ConditionSource) -> Teacher:
        return replace(self, conditions=conditions)

    def reference(self) -> TeacherRef:
        """What a manifest records: a file teacher by its absolute path, so the trajectory finds
        it from any working directory (its sha256 still decides whether it is the same one)."""
        source = self.source
        if not source.startswith(BUILTIN_PREFIX):
            source = str(Path(source).absolute())
        return TeacherRef(
            source=source,
            sha256=self.sha256,
            network=self.spec.model_dump(mode="json"),
            dataset=self.dataset,
        )


class SampleConditions(Protocol):
    """How `sample` conditions and decodes a family's generator: which images a call draws,
    their conditions, and what the generator's output becomes on disk."""

    per_seed: ConditionSource  # drawn from each seed's stream, after its noise

    def items(self, seeds: list[int]) -> list[tuple[int, int, int]]:
        """(image name, seed, condition index) of every image, in the order they are written."""
        ...

    def provenance(self, seeds: list[int]) -> dict[str, Any]:
        """What the sample record says of the conditions (e.g. the prompt file)."""
        ...

    def allow_best_of(self) -> None:
        """Refuse best-of-K sampling where the conditions are not drawn per seed."""
        ...

    def batch(self, items: list[tuple[int, int, int]], per_seed: Conditioning) -> Conditioning:
        """The conditions of a batch of items (from those drawn per seed)."""
        ...

    def output_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The generator's output as samples (images in [-1, 1], or vectors)."""
        ...

    def labels(self, cond: Conditioning) -> np.ndarray | None: ...

    def prompts_of(self, items: list[tuple[int, int, int]]) -> list[str] | None:
        """Each item's prompt, listed beside the samples (None: not conditioned on prompts)."""
        ...


class ClassConditions:
    """Samples conditioned per seed on class labels (or nothing), written as drawn."""

    def __init__(self, label_dim: int, fixed_class: int | None = None) -> None:
        if fixed_class is not None and not fixed_class < label_dim:
            raise ConfigError(f"--class {fixed_class} is out of range for {label_dim} classes")
        self.per_seed = condition_source(label_dim, fixed_class)

    def items(self, seeds: list[int]) -> list[tuple[int, int, int]]:
        return [(seed, seed, -1) for seed in seeds]

    def provenance(self, seeds: list[int]) -> dict[str, Any]:
        return {}

    def allow_best_of(self) -> None:
        pass

    def batch(self, items, per_seed: Conditioning) -> Conditioning:
        return per_seed

    def output_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(data_shape)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def labels(self, cond: Conditioning) -> np.ndarray | None:
        return self.per_seed.labels(cond)

    def prompts_of(self, items) -> list[str] | None:
        return None


class TeacherFamily:
    """The behaviour of networks stored as weight files (see the module docstring); a family
    overrides what differs for its teachers."""

    description: ClassVar[str] = "denoiser networks"  # names the family in messages
    # Config fields only this family takes, with the value that means "not used": another
    # family's teacher refuses them (e.g. --prompts for a class-conditional teacher).
    options: ClassVar[dict[str, Any]] = {}
    # --data as unconditioned samples in the teacher's space (DiffRatio's ratio network).
    supports_real_data: ClassVar[bool] = True

    # -- recognising and opening teachers, and generator files ------------------------------
    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether `path` holds a teacher of this family."""
        return False

    @classmethod
    def open(
        cls, source: str, path: Path, device, expected_sha256: str | None, recorded_in
    ) -> Teacher:
        raise NotImplementedError

    @classmethod
    def claims_generator(cls, info: dict) -> bool:
        """Whether a generator file with this provenance was trained from this family."""
        return False

    @classmethod
    def for_generator(cls, info: dict, device, verify: bool, model_folder: str | None):
        """The family instance that samples a generator file with this provenance."""
        return cls()

    @classmethod
    def reopen(cls, teacher: Teacher, device) -> nn.Module:
        """The teacher's weights read again (after they were freed), checked by sha256."""
        path = teacher_location(teacher.source)
        return cls.open(teacher.source, path, device, teacher.sha256, "this run").denoiser

    def format_name(self, teacher: Teacher) -> str:
        """The kind of file `disback teacher inspect` reports."""
        return "edm-pickle" if teacher.source.endswith(".pkl") else "disback"

    # -- settings --------------------------------------------------------------------------
    def size_class(self, teacher: Teacher) -> str:
        """vector, image, or edm (read from an EDM pickle, converted from one, or as large)."""
        if len(teacher.spec.data_shape) == 1:
            return "vector"
        if "edm" in teacher.info or teacher.parameter_count >= EDM_SIZE_PARAMETERS:
            return "edm"
        return "image"

    def defaults(self, teacher: Teacher) -> dict[str, tuple[Any, str]]:
        """Values for unset settings, by teacher size, with where they came from."""
        size = self.size_class(teacher)
        source = f"default for {size} teachers"
        return {key: (by[size], source) for key, by in SIZE_DEFAULTS.items()}

    def resolve(self, cfg, teacher: Teacher, update: dict, sources: dict, recorded=None) -> None:
        """Family rules for a record or backtrack config: defaults and refusals (`recorded`: the
        trajectory's manifest, for backtrack)."""
        if cfg.dsm_sigma == "discrete" and getattr(teacher.denoiser, "sigmas", None) is None:
            raise ConfigError("--dsm-sigma discrete is for discrete-time (text-to-image) teachers")

    def record_warnings(self, cfg) -> list[str]:
        """What a resolved recording config is likely to waste, said before it starts."""
        return []

    def resolve_g0(self, cfg, teacher: Teacher, student_sigma: float | None, update, sources):
        """sigma_init of G0: the student file's own, else 2.5 (SiD)."""
        if student_sigma is not None:
            update["sigma_init"], sources["sigma_init"] = student_sigma, "student"
        elif cfg.sigma_init is None:
            update["sigma_init"], sources["sigma_init"] = DEFAULT_SIGMA_INIT, "default"

    # -- training ---------------------------------------------------------------------------
    def training_conditions(
        self, teacher: Teacher, cfg, sources: dict, device, recorded: PromptsRef | None = None
    ) -> tuple[Teacher, PromptsRef | None]:
        """The teacher conditioned as `cfg` asks, and what the manifest records of it
        (`recorded`: what the trajectory recorded)."""
        return teacher, None

    def g0_input_scale(self, cfg) -> float | None:
        """G0(z) = D(scale z, sigma_init); None: scale = sigma_init (EDM's convention)."""
        return None

    def load_student(
        self, path: str, teacher: Teacher, device, expected_sha256: str | None, verify: bool
    ) -> DenoiserFile:
        return load_denoiser(path, device, expected_sha256, verify)

    def target(self, denoiser: nn.Module, guidance_scale: float | None) -> nn.Module:
        """A target node as the generator loss queries it (guided, for families with guidance)."""
        return denoiser

    def default_guidance(self) -> float | None:
        """The guidance scale of the target when none is given (families with guidance)."""
        return None

    def query_levels(self, teacher: Teacher):
        """Noise levels every generator loss must query at (None: each loss's own)."""
        return None

    def discriminator_levels(self, teacher: Teacher, high: int) -> DiscreteSigma:
        """Where a discriminator sees noised samples: DMD2's "diffusion GAN", a uniform index
        below `high` of 1000 Karras levels."""
        from disback_cli.method.noise import KARRAS_LEVELS, karras_sigma  # (imports the models)

        index = torch.arange(KARRAS_LEVELS, dtype=torch.float32)
        return DiscreteSigma(karras_sigma(index / (KARRAS_LEVELS - 1)), 0, high)

    def shard_units(self, denoiser: nn.Module) -> list[nn.Module]:
        """The blocks FSDP shards one by one (`--parallel fsdp`): those its architecture names."""
        return blocks_of(denoiser)

    def node_format(self, record_cfg) -> NodeFormat:
        """How the path nodes of a recording with this config are stored."""
        return FULL_WEIGHTS

    def trained_weights(self, backtrack_cfg) -> AllWeights:
        """What of the generator and the fake score trains in `backtrack` (every weight)."""
        return ALL_WEIGHTS

    @classmethod
    def exporters(cls) -> dict[str, Any]:
        """`disback export`'s formats for this family's generators (`disback_cli.export`): the
        self-describing file, and the one-step graph as ONNX."""
        from disback_cli.export.onnx_graph import OnnxExport
        from disback_cli.export.safetensors_file import SafetensorsExport

        return {"safetensors": SafetensorsExport(), "onnx": OnnxExport()}

    def generator_info(self, teacher: Teacher) -> dict[str, Any]:
        """What a generator file records besides the network, for sampling it later."""
        return {}

    # -- sampling ---------------------------------------------------------------------------
    def open_real_data(self, spec: str, teacher: Teacher):
        """--data for a discriminator (`method.adversarial`): samples in the teacher's space
        with the conditions it is trained on (class labels, or captions)."""
        from disback_cli.method.data import open_data  # the data layer sits above the models

        return open_data(spec, teacher.spec.data_shape, teacher.spec.label_dim)

    def sample_conditions(self, denoiser: nn.Module, cfg, device) -> SampleConditions:
        """How `sample` conditions and decodes this family's generators (or its teacher)."""
        if cfg.prompts is not None:
            raise ConfigError("--prompts is for text-to-image generators")
        return ClassConditions(denoiser.label_dim, cfg.class_label)


def builtin_path(name: str) -> Path:
    if name not in BUILTIN_TEACHERS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_TEACHERS)
        raise DisbackError(f"unknown built-in teacher {BUILTIN_PREFIX}{name} (known: {known})")
    return Path(str(resources.files("disback_cli") / "builtin" / f"{name}.safetensors"))


def teacher_location(source: str) -> Path:
    """Where a teacher source is: a built-in teacher's file, or the path given."""
    if source.startswith(BUILTIN_PREFIX):
        return builtin_path(source[len(BUILTIN_PREFIX) :])
    path = Path(source)
    if source in BUILTIN_TEACHERS and not (path.exists() or path.is_symlink()):
        raise ConfigError(
            f"{source}: no such file; for the built-in teacher, say {BUILTIN_PREFIX}{source}"
        )
    return path
