"""Stable Diffusion teachers (SD 1.x, 2.x, SDXL) as a teacher family.

What differs from networks stored as one file: the teacher is a diffusers model folder whose UNet
is a discrete-time denoiser; it is conditioned on prompts (encoded by its text encoders, with the
unconditional twins guidance needs) and guided as the target; G0 reads pure noise at a timestep;
every loss queries the scores at the UNet's own timesteps; path nodes may be stored as LoRA
adapters; a student may be a diffusers UNet folder; generator files name the text encoders and
the VAE, which turn prompts into conditions and latents into images when sampling.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from disback_cli.config.teacher_kinds import TEXT_DEFAULTS
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.models.conditioning import Conditioning, Unconditional
from disback_cli.models.denoiser_files import DenoiserFile, build_with_weights, load_denoiser
from disback_cli.models.discrete_ddpm import DiscreteSigma
from disback_cli.models.family import EDM_DEFAULT_SIGMA, Teacher, TeacherFamily
from disback_cli.models.path_nodes import FULL_WEIGHTS
from disback_cli.models.text_to_image.captioned import open_captioned_latents
from disback_cli.models.text_to_image.folder import (
    DiffusersFolder,
    hash_recorded,
    is_diffusers_folder,
    is_unet_folder,
    read_folder,
    read_unet_folder,
    unet_tensors,
)
from disback_cli.models.text_to_image.guidance import guided
from disback_cli.models.text_to_image.lora import (
    Adapters,
    LowRankAdapters,
    adapter_rate,
    slow_adapter_warning,
)
from disback_cli.models.text_to_image.sampling import open_sampling, sampling_info
from disback_cli.models.text_to_image.text import PromptSource, TextEncoder, read_prompts
from disback_cli.models.text_to_image.vae import LatentDecoder
from disback_cli.models.trained_weights import ALL_WEIGHTS
from disback_cli.store.manifests import PromptsRef
from disback_cli.store.tensorfile import read_safetensors

NEEDS_PROMPTS = "a text-to-image teacher needs --prompts FILE"
# SD was trained with 10 % of its captions dropped; recording so keeps the path nodes'
# unconditional branch fitted (docs/benchmarks.md measures it against recording without).
UNCOND_FRACTION = 0.1


class NeedsPrompts(Unconditional):
    """The conditions of a text-to-image teacher before its prompt file is read."""

    def draw(self, n: int, rng: torch.Generator, device: torch.device) -> Conditioning:
        raise ConfigError(NEEDS_PROMPTS)


class DiffusersFamily(TeacherFamily):
    """A diffusers model folder's UNet as a frozen denoiser; the text encoders and the VAE are
    loaded where they are needed (prompts, sampling)."""

    description = "text-to-image teachers (a diffusers model folder)"
    options: ClassVar[dict[str, Any]] = {
        "prompts": None,
        "timestep": None,
        "lora_rank": None,
        "gradient_checkpointing": False,
        "guidance_scale": 1.0,
        "fake_guidance_scale": 1.0,
        "uncond_fraction": None,
    }
    supports_real_data = False  # its samples need captions: `open_real_data`

    def __init__(self, folder: DiffusersFolder, sampling=None) -> None:
        self.folder = folder
        self.sampling = sampling  # (TextEncoder, LatentDecoder) of a generator being sampled

    @classmethod
    def claims(cls, path: Path) -> bool:
        return is_diffusers_folder(path)

    @classmethod
    def open(cls, source, path, device, expected_sha256, recorded_in) -> Teacher:
        differs = (
            f"teacher {source} is not the one {recorded_in} was recorded with (sha256 differs)"
        )
        hashed = {} if expected_sha256 is None else hash_recorded(path, expected_sha256)
        if hashed is None:
            raise DisbackError(differs)
        folder = read_folder(path)
        folder.files.update(hashed)  # parsed as SDXL but recorded as SD (or back): differs
        if expected_sha256 is not None and folder.digest() != expected_sha256:
            raise DisbackError(differs)
        weights = folder.weights["unet"]
        tensors, _, digest = read_safetensors(weights)
        rel = str(weights.relative_to(folder.root))
        if folder.files.setdefault(rel, digest) != digest:
            raise DisbackError(f"{weights}: changed while being read")
        network = folder.spec()
        denoiser = build_with_weights(network, unet_tensors(tensors), str(weights))
        info = {"role": "teacher", "text_to_image": {"pipeline": folder.pipeline, "xl": folder.xl}}
        return Teacher(
            denoiser=denoiser.to(device).eval().requires_grad_(False),
            spec=network,
            source=source,
            sha256=folder.digest(),
            dataset=None,
            train_sigma=EDM_DEFAULT_SIGMA,
            info=info,
            family=cls(folder),
            conditions=NeedsPrompts(),
        )

    @classmethod
    def claims_generator(cls, info: dict) -> bool:
        return "text_to_image" in info

    @classmethod
    def for_generator(cls, info, device, verify, model_folder) -> DiffusersFamily:
        encoder, decoder = open_sampling(info["text_to_image"], device, verify, model_folder)
        return cls(encoder.folder, (encoder, decoder))

    def format_name(self, teacher: Teacher) -> str:
        return "diffusers"

    # -- settings --------------------------------------------------------------------------
    def size_class(self, teacher: Teacher) -> str:
        return "text"

    def _kind(self) -> str:
        return next(k for k in TEXT_DEFAULTS if k.startswith("SDXL") == self.folder.xl)

    def _own_defaults(self) -> dict[str, Any]:
        return TEXT_DEFAULTS[self._kind()]

    def defaults(self, teacher: Teacher) -> dict[str, tuple[Any, str]]:
        source = f"default for {self._kind()}"
        return {key: (value, source) for key, value in self._own_defaults().items()}

    def record_warnings(self, cfg) -> list[str]:
        """Adapters at a rate too low to move the path (the rule of `lora.adapter_rate`)."""
        if not cfg.lora_rank:
            return []
        warning = slow_adapter_warning(cfg.lr, cfg.lora_rank, self._own_defaults()["lr"])
        return [warning] if warning else []

    def resolve(self, cfg, teacher: Teacher, update: dict, sources: dict, recorded=None) -> None:
        """A discrete-time teacher knows only its own timesteps: its fake score and path nodes
        train at all of them, as DMD2 trains its fake score on SD. The target is guided (DMD2's
        scales); prompts come from the flag, else from the trajectory."""
        if cfg.dsm_sigma not in (None, "discrete"):
            raise ConfigError(
                f"--dsm-sigma {cfg.dsm_sigma} does not apply to a text-to-image teacher, which "
                "knows only its own timesteps (discrete)"
            )
        if cfg.dsm_sigma is None:
            update["dsm_sigma"], sources["dsm_sigma"] = "discrete", "default for text teachers"
        if "guidance_scale" in type(cfg).model_fields and cfg.guidance_scale is None:
            update["guidance_scale"] = self.default_guidance()
            sources["guidance_scale"] = "default for text teachers (DMD2)"
        if "uncond_fraction" in type(cfg).model_fields and cfg.uncond_fraction is None:
            update["uncond_fraction"] = UNCOND_FRACTION
            sources["uncond_fraction"] = "default for text teachers (SD's caption dropout)"
        rank = getattr(cfg, "lora_rank", None)
        for rate in ("lr", "lr_g", "lr_fake") if rank else ():
            if rate in type(cfg).model_fields and getattr(cfg, rate) is None:
                update[rate] = adapter_rate(self._own_defaults()[rate], rank)
                sources[rate] = (
                    f"default for rank-{rank} adapters (full-weight rate x 100 / sqrt({rank}), "
                    "DMD2)"
                )
        if cfg.prompts is None and (recorded is None or recorded.prompts is None):
            raise ConfigError(NEEDS_PROMPTS)
        if cfg.prompts is None:
            update["prompts"], sources["prompts"] = recorded.prompts.file, "trajectory"

    def resolve_g0(self, cfg, teacher: Teacher, student_sigma, update, sources) -> None:
        """G0 maps pure noise, read as the DDPM input at a timestep, to x0 (DMD2): sigma_init is
        that timestep's sigma. An explicit --sigma-init keeps EDM's convention G0(z) =
        D(sigma_init z, sigma_init) instead."""
        if student_sigma is not None:
            update["sigma_init"], sources["sigma_init"] = student_sigma, "student"
            return
        if cfg.sigma_init is not None:
            if cfg.timestep is not None:
                raise ConfigError("give either --timestep or --sigma-init, not both")
            return
        sigmas = teacher.denoiser.sigmas
        timestep = cfg.timestep if cfg.timestep is not None else len(sigmas) - 1
        if timestep >= len(sigmas):
            raise ConfigError(
                f"--timestep {timestep}: the teacher has timesteps 0..{len(sigmas) - 1}"
            )
        if cfg.timestep is None:
            update["timestep"], sources["timestep"] = timestep, "default for text teachers"
        update["sigma_init"], sources["sigma_init"] = float(sigmas[timestep]), "timestep"

    # -- training ---------------------------------------------------------------------------
    def training_conditions(self, teacher, cfg, sources, device, recorded=None):
        """The teacher conditioned on the prompts of `cfg.prompts` (drawn per training batch),
        and the reference a manifest keeps of them; prompts taken from the trajectory must be
        the file it recorded."""
        prompts, digest = read_prompts(cfg.prompts)
        from_trajectory = sources.get("prompts") == "trajectory"
        if from_trajectory and digest != recorded.sha256:
            raise DisbackError(
                f"{cfg.prompts}: not the prompt file the trajectory was recorded with (sha256 "
                "differs); pass --prompts FILE to train on other prompts"
            )
        dropout = getattr(cfg, "uncond_fraction", None) or 0.0  # recording only
        source = PromptSource(TextEncoder(self.folder, device), prompts, dropout)
        ref = PromptsRef(file=str(Path(cfg.prompts).absolute()), sha256=digest, count=len(prompts))
        return teacher.with_conditions(source), ref

    def open_real_data(self, spec: str, teacher: Teacher):
        """Captioned VAE latents (`captioned`), the captions encoded as the prompts are."""
        encoder = teacher.conditions.encoder
        return open_captioned_latents(spec, teacher.spec.data_shape, encoder)

    def g0_input_scale(self, cfg) -> float | None:
        if cfg.timestep is None:
            return None
        return math.sqrt(1 + cfg.sigma_init**2)

    def load_student(self, path, teacher, device, expected_sha256, verify) -> DenoiserFile:
        """A disback denoiser file, or a diffusers UNet folder such as a distilled one-step UNet,
        read with the teacher's preconditioning."""
        if not is_unet_folder(path):
            return load_denoiser(path, device, expected_sha256, verify)
        spec, tensors, digest = read_unet_folder(path, teacher.spec, expected_sha256, verify)
        denoiser = build_with_weights(spec, tensors, str(path)).to(device).eval()
        return DenoiserFile(denoiser.requires_grad_(False), spec, {"role": "student"}, digest)

    def target(self, denoiser, guidance_scale):
        return guided(denoiser, guidance_scale)

    def default_guidance(self) -> float:
        """DMD2's: 1.75 for SD 1.x/2.x, 8 for SDXL (also the DisBack SDXL release's)."""
        return 8.0 if self.folder.xl else 1.75

    def query_levels(self, teacher: Teacher) -> DiscreteSigma:
        return DiscreteSigma.generator_levels(teacher.denoiser.sigmas)

    def discriminator_levels(self, teacher: Teacher, high: int) -> DiscreteSigma:
        """The teacher's own timesteps below `high` (DMD2 on SD: randint(0, max_timestep))."""
        table = teacher.denoiser.sigmas
        return DiscreteSigma(table, 0, min(high, len(table)))

    def node_format(self, record_cfg):
        return Adapters() if record_cfg.lora_rank else FULL_WEIGHTS

    def trained_weights(self, backtrack_cfg):
        rank = backtrack_cfg.lora_rank
        return LowRankAdapters(rank) if rank else ALL_WEIGHTS

    @classmethod
    def exporters(cls) -> dict[str, Any]:
        """A diffusers UNet or pipeline folder, and the self-describing file (sampled with the
        teacher's text encoders and VAE, which it names)."""
        from disback_cli.export.safetensors_file import SafetensorsExport
        from disback_cli.models.text_to_image.export import DiffusersExport

        return {
            "safetensors": SafetensorsExport(" --prompts PROMPTS.txt"),
            "diffusers": DiffusersExport(),
        }

    def generator_info(self, teacher: Teacher) -> dict[str, Any]:
        return {"text_to_image": sampling_info(self.folder)}

    # -- sampling ---------------------------------------------------------------------------
    def sample_conditions(self, denoiser, cfg, device) -> PromptConditions:
        if cfg.prompts is None:
            raise ConfigError("a text-to-image generator needs --prompts FILE")
        if cfg.class_label is not None:
            raise ConfigError(f"--class {cfg.class_label} is out of range for 0 classes")
        if self.sampling is None:  # a teacher sampled with EDM's Heun sampler
            self.sampling = (TextEncoder(self.folder, device), LatentDecoder(self.folder, device))
        return PromptConditions(*self.sampling, cfg.prompts)


class PromptConditions:
    """Samples of a text-to-image generator: -n images (seeds) per prompt of a prompt file,
    decoded by the teacher's VAE; each image's prompt and seed are listed beside them."""

    per_seed = Unconditional()

    def __init__(self, encoder: TextEncoder, decoder: LatentDecoder, path: str) -> None:
        self.encoder, self.decoder, self.path = encoder, decoder, path
        self.prompts, self.sha256 = read_prompts(path)

    def items(self, seeds: list[int]) -> list[tuple[int, int, int]]:
        return [
            (j * len(seeds) + i, seed, j)
            for j in range(len(self.prompts))
            for i, seed in enumerate(seeds)
        ]

    def provenance(self, seeds: list[int]) -> dict[str, Any]:
        return {
            "prompts": str(Path(self.path).absolute()),
            "prompts_sha256": self.sha256,
            "per_prompt": len(seeds),
        }

    def allow_best_of(self) -> None:
        raise ConfigError("--best-of is not available for text-to-image generators")

    def batch(self, items, per_seed: Conditioning) -> Conditioning:
        return self.encoder.encode([self.prompts[j] for _, _, j in items])

    def output_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        _, height, width = data_shape
        scale = self.encoder.folder.vae_scale
        return (3, height * scale, width * scale)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)

    def labels(self, cond: Conditioning) -> np.ndarray | None:
        return None

    def prompts_of(self, items) -> list[str] | None:
        return [self.prompts[j] for _, _, j in items]
