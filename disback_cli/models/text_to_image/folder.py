"""A Stable Diffusion model folder in the diffusers layout, read as a teacher.

    model_index.json        the pipeline's class and its components
    unet/                   config.json + diffusion_pytorch_model[.fp16].safetensors
    scheduler/              scheduler_config.json (only its noise schedule is read)
    vae/                    config.json + diffusion_pytorch_model[.fp16].safetensors
    text_encoder/, tokenizer/          CLIP (SD 1.x, 2.x; SDXL's first encoder)
    text_encoder_2/, tokenizer_2/      OpenCLIP bigG with projection (SDXL)

Only configuration JSON, tokenizer vocabularies and safetensors weights are read: a component
whose weights exist only as a pickle (`.bin`, `.ckpt`, `.pt`, `.pth`, `.pkl`) is refused, naming
the file, because unpickling can run code. The teacher's sha256 is that of a canonical list of
every file read with its own sha256, so a path node or generator names exactly these files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from disback_cli.errors import DisbackError
from disback_cli.models.components import bounded_config
from disback_cli.models.networks import NetworkSpec
from disback_cli.models.text_to_image.unet import ARCH, unet_config
from disback_cli.store.component_files import MAX_CONFIG_BYTES, find_weights, read_config
from disback_cli.store.fileio import (
    check_regular_file,
    hash_regular_file,
    sha256_bytes,
)
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES

INDEX = "model_index.json"
MAX_TOKENIZER_BYTES = 64 << 20
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_WEIGHTS = "model"
# The classes a component may name in model_index.json; nothing else is built.
COMPONENT_CLASSES = {
    "unet": {"UNet2DConditionModel"},
    "vae": {"AutoencoderKL"},
    "text_encoder": {"CLIPTextModel", "CLIPTextModelWithProjection"},
    "text_encoder_2": {"CLIPTextModelWithProjection", "CLIPTextModel"},
    "tokenizer": {"CLIPTokenizer", "CLIPTokenizerFast"},
    "tokenizer_2": {"CLIPTokenizer", "CLIPTokenizerFast"},
}
NEEDED = ("unet", "scheduler", "vae", "text_encoder", "tokenizer")
# A CLIP tokenizer's vocabulary: slow files, or the fast tokenizer's one file.
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
NEEDED_XL = ("text_encoder_2", "tokenizer_2")
# The stem of each weighted component's safetensors file.
WEIGHT_STEMS = {
    "unet": DIFFUSERS_WEIGHTS,
    "vae": DIFFUSERS_WEIGHTS,
    "text_encoder": TRANSFORMERS_WEIGHTS,
    "text_encoder_2": TRANSFORMERS_WEIGHTS,
}


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / INDEX).exists()


@dataclass
class DiffusersFolder:
    """What a model folder holds, checked, before any weight is loaded."""

    root: Path
    pipeline: str  # model_index.json's _class_name, e.g. StableDiffusionXLPipeline
    xl: bool  # two text encoders, pooled embeddings and time ids (SDXL)
    zeros_for_empty_prompt: bool  # SDXL's unconditional embedding is all zeros
    unet: dict[str, Any]  # the UNet's config (constructor kwargs)
    schedule: dict[str, Any]  # beta schedule and prediction type of the scheduler
    vae: dict[str, Any]  # the VAE's config
    weights: dict[str, Path] = field(default_factory=dict)  # component -> safetensors file
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, once hashed

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the latents, from the UNet config, checked: a size that
        is not a positive number, or a pair of equal ones, is refused in one line."""
        size, channels = self.unet.get("sample_size", 64), self.unet.get("in_channels", 4)
        if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
            size = size[0]
        for name, value in (("sample_size", size), ("in_channels", channels)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 14:
                raise DisbackError(
                    f"{self.root / 'unet' / 'config.json'}: {name} {str(value)[:40]} is not a "
                    "positive size (square latents only)"
                )
        return (channels, size, size)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along each axis."""
        return 2 ** (len(self.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)

    def spec(self) -> NetworkSpec:
        """The UNet as our network: the `ddpm` preconditioning with the scheduler's noise."""
        return NetworkSpec(
            arch=ARCH,
            arch_kwargs=self.unet,
            precond="ddpm",
            precond_kwargs=self.schedule,
            data_shape=self.latent_shape,
        )

    def component_files(self, component: str) -> list[Path]:
        """Every file of `component` that loading it reads (config, vocabularies, weights)."""
        return _component_files(self.root, component, self.weights.get(component))

    def hash_files(self, components: tuple[str, ...] | None = None) -> dict[str, str]:
        """sha256 of every file the given components (default: all) read, by relative path."""
        components = components or self.components
        for component in components:
            for path in self.component_files(component):
                rel = str(path.relative_to(self.root))
                if rel not in self.files:
                    self.files[rel] = hash_regular_file(path, MAX_SAFETENSORS_BYTES, "model file")
        self.files.setdefault(
            INDEX, hash_regular_file(self.root / INDEX, MAX_CONFIG_BYTES, "model_index.json")
        )
        return {k: self.files[k] for k in sorted(self.files)}

    @property
    def components(self) -> tuple[str, ...]:
        return NEEDED + (NEEDED_XL if self.xl else ())

    def digest(self) -> str:
        """The teacher's sha256: of the sorted list of its files and their sha256."""
        return listing_digest(self.hash_files())


def listing_digest(files: dict[str, str]) -> str:
    return sha256_bytes(json.dumps(files, sort_keys=True, separators=(",", ":")).encode())


def _component_files(root: Path, component: str, weights: Path | None) -> list[Path]:
    folder = root / component
    if component.startswith("tokenizer"):  # every entry it may read, whatever its kind:
        return sorted(  # a FIFO or a link to a device is refused, not skipped
            p for p in folder.iterdir() if p.suffix in (".json", ".txt", ".model")
        )
    config = "scheduler_config.json" if component == "scheduler" else "config.json"
    return [folder / config] + ([weights] if weights is not None else [])


def hash_recorded(root: Path, expected_sha256: str) -> dict[str, str] | None:
    """The sha256 of every file of the folder, by relative path, if together they are the
    teacher `expected_sha256` (as an SD or as an SDXL folder), else None: found from the file
    listing alone, before any configuration is parsed, so a folder changed since it was
    recorded is refused by its hash, not by whatever its new configs would do."""
    hashed: dict[str, str] = {}
    for components in (NEEDED, NEEDED + NEEDED_XL):
        if not all((root / c).is_dir() for c in components):
            continue
        listing = {INDEX: hash_regular_file(root / INDEX, MAX_CONFIG_BYTES, "model_index.json")}
        for component in components:
            stem = WEIGHT_STEMS.get(component)
            weights = find_weights(root / component, stem) if stem else None
            for path in _component_files(root, component, weights):
                rel = str(path.relative_to(root))
                if rel not in hashed:
                    hashed[rel] = hash_regular_file(path, MAX_SAFETENSORS_BYTES, "model file")
                listing[rel] = hashed[rel]
        if listing_digest(listing) == expected_sha256:
            return listing
    return None


def _scheduler(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The noise schedule of a scheduler config, as `DiscreteDDPMPrecond` kwargs."""
    if config.get("trained_betas") is not None:
        raise DisbackError(f"{path}: trained_betas are not supported")
    if config.get("rescale_betas_zero_snr"):
        raise DisbackError(f"{path}: zero-terminal-SNR schedules are not supported")
    schedule = {
        "prediction_type": config.get("prediction_type", "epsilon"),
        "beta_start": config.get("beta_start", 0.0001),
        "beta_end": config.get("beta_end", 0.02),
        "beta_schedule": config.get("beta_schedule", "linear"),
        "num_train_timesteps": config.get("num_train_timesteps", 1000),
    }
    types = (str, float, float, str, int)
    for (key, value), kind in zip(schedule.items(), types, strict=True):
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DisbackError(f"{path}: {key} must be a {kind.__name__}")
    return schedule


def read_folder(root: str | Path) -> DiffusersFolder:
    """Check a diffusers model folder and read its configurations (no weights yet): every
    needed component present, of a known class, with safetensors weights."""
    root = Path(root)
    index = read_config(root / INDEX, "model_index.json")
    pipeline = index.get("_class_name")
    if not isinstance(pipeline, str) or "Pipeline" not in pipeline:
        raise DisbackError(f"{root / INDEX}: not a diffusers pipeline index")
    unet_index = index.get("unet")
    if not (isinstance(unet_index, list) and len(unet_index) == 2):
        raise DisbackError(f"{root / INDEX}: names no unet")
    for component, allowed in COMPONENT_CLASSES.items():
        entry = index.get(component)
        if entry is None:
            continue
        name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if name is not None and name not in allowed:
            raise DisbackError(
                f"{root / INDEX}: {component} is a {name!r:.60}, not one of "
                f"{', '.join(sorted(allowed))}"
            )
    unet = (
        unet_config(read_config(root / "unet" / "config.json", "UNet config"))
        if (root / "unet").is_dir()
        else None
    )
    xl = unet is not None and unet.get("addition_embed_type") == "text_time"
    for component in NEEDED + (NEEDED_XL if xl else ()):
        if not (root / component).is_dir() or index.get(component) in (None, [None, None]):
            raise DisbackError(f"{root}: the model folder has no {component}/ component")
    folder = DiffusersFolder(
        root=root,
        pipeline=pipeline,
        xl=xl,
        zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", xl)),
        unet=unet,
        schedule=_scheduler(
            read_config(root / "scheduler" / "scheduler_config.json", "scheduler config"),
            root / "scheduler",
        ),
        vae=bounded_config(
            read_config(root / "vae" / "config.json", "VAE config"), root / "vae", "VAE"
        ),
    )
    for component in folder.components:
        if component in WEIGHT_STEMS:
            folder.weights[component] = find_weights(root / component, WEIGHT_STEMS[component])
    for tokenizer in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        for path in folder.component_files(tokenizer):
            check_regular_file(path, MAX_TOKENIZER_BYTES, "tokenizer file")
        present = [all((root / tokenizer / n).is_file() for n in s) for s in TOKENIZER_FILES]
        if not any(present):  # without them a tokenizer is built blank: every prompt the same
            raise DisbackError(
                f"{root / tokenizer}: no vocabulary (vocab.json and merges.txt, or tokenizer.json)"
            )
    try:
        folder.spec()
    except ValueError as exc:  # pydantic: the UNet config breaks a NetworkSpec bound
        first = str(exc).splitlines()
        raise DisbackError(f"{root / 'unet' / 'config.json'}: {first[-1].strip()}") from None
    return folder


def unet_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' UNet state dict as the tensors of our denoiser (DiscreteDDPMPrecond holding
    DiffusersUNet holding the UNet): every name under `model.unet.`."""
    return {f"model.unet.{k}": v for k, v in tensors.items()}


def is_unet_folder(path: str | Path) -> bool:
    """A diffusers UNet on its own (config.json + weights), e.g. a distilled one-step UNet."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not (path / INDEX).exists()


def read_unet_folder(
    path: str | Path, like: NetworkSpec, expected_sha256: str | None = None, verify: bool = True
) -> tuple[NetworkSpec, dict[str, torch.Tensor], str]:
    """A UNet folder as a network of the teacher's family (`like`: its preconditioning and
    latent shape), its tensors under our names, and the sha256 of its two files."""
    from disback_cli.store.tensorfile import read_safetensors

    path = Path(path)
    config_path = path / "config.json"
    config = unet_config(read_config(config_path, "UNet config"))
    weights = find_weights(path, DIFFUSERS_WEIGHTS)
    tensors, _, weights_sha = read_safetensors(weights, verify=True)
    listing = {
        "config.json": hash_regular_file(config_path, MAX_CONFIG_BYTES, "UNet config"),
        weights.name: weights_sha,
    }
    digest = sha256_bytes(json.dumps(listing, sort_keys=True, separators=(",", ":")).encode())
    if verify and expected_sha256 is not None and digest != expected_sha256:
        raise DisbackError(
            f"{path}: not the UNet the trajectory was recorded with (sha256 differs)"
        )
    try:
        spec = NetworkSpec.model_validate({**like.model_dump(), "arch_kwargs": config})
    except ValueError as exc:
        raise DisbackError(f"{config_path}: {str(exc).splitlines()[-1].strip()}") from None
    return spec, unet_tensors(tensors), digest
