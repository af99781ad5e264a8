"""`--format diffusers`: a text-to-image generator as a diffusers UNet folder, or with
`--pipeline` as a whole pipeline folder that `DiffusionPipeline.from_pretrained` opens.

The generator is DMD2's G(z) = D(sqrt(1 + sigma^2) z, sigma): the UNet reads pure noise z as the
DDPM input at the integer timestep T whose sigma is sigma_init, and the image is its x0
prediction. diffusers' LCMScheduler does exactly that in one step (x0 from the UNet's output at
T, then c_out x0 + c_skip z, with c_skip 0 and c_out 1 to float32 rounding at T under the timestep
scaling chosen here), so `pipe(prompt, num_inference_steps=1, timesteps=[T], guidance_scale=0)`
with the same latents draws the generator's image. A generator fed sigma z instead (an explicit
--sigma-init run) or at a fractional timestep has no diffusers scheduler that feeds it, and is
refused.

The pipeline's text encoders, tokenizers and VAE are the teacher's files the generator names,
copied byte for byte and checked against their recorded sha256 while they are copied; its UNet is
written by disback's atomic writer, cast to --dtype.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from disback_cli.config.export import ExportConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.export import DTYPES, ExportSource, Usage
from disback_cli.models.text_to_image.folder import INDEX
from disback_cli.models.text_to_image.sampling import check_recorded_files
from disback_cli.models.text_to_image.unet import ARCH, _diffusers
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.component_files import read_config
from disback_cli.store.export_folder import ExportFolder
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES, safetensors_chunks

UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler/scheduler_config.json"
ROUNDING = 2.0**-24  # float32's spacing just below 1: c_skip and 1 - c_out must not exceed it
TIMESTEP_TOLERANCE = 1e-3  # sigma_init was a trained timestep's sigma, read back in float32
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
BLOCK = 1 << 20
# The text-to-image pipeline of each kind of teacher (SDXL: two text encoders), its components
# as disback reads them (so the pipeline encodes prompts exactly as the generator was trained),
# and the optional components it is given none of.
PIPELINES = {False: "StableDiffusionPipeline", True: "StableDiffusionXLPipeline"}
COMPONENTS = {
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}
OPTIONAL = {
    False: ("safety_checker", "feature_extractor", "image_encoder"),
    True: ("feature_extractor", "image_encoder"),
}


def is_xl(source: ExportSource) -> bool:
    return source.spec.arch_kwargs.get("addition_embed_type") == "text_time"


def one_step_timestep(source: ExportSource) -> int:
    """The integer timestep T at which the UNet reads pure noise, or a one-line refusal."""
    if source.spec.arch != ARCH or source.spec.precond != "ddpm":
        raise ConfigError(
            f"--format diffusers: the generator is a {source.spec.arch} ({source.spec.precond}), "
            "not a diffusers UNet with its DDPM schedule"
        )
    generator = source.generator
    sigma = generator.sigma_init
    scale = math.sqrt(1 + sigma**2)
    if not math.isclose(generator.input_scale, scale, rel_tol=1e-6):
        raise ConfigError(
            f"--format diffusers: the generator reads {generator.input_scale:.6g} z at sigma "
            f"{sigma:.6g} (an explicit --sigma-init run), not pure noise at a timestep "
            f"(input scale {scale:.6g}), which no diffusers scheduler feeds its UNet"
        )
    t = float(generator.denoiser.timestep(torch.tensor(sigma, dtype=torch.float32)))
    if abs(t - round(t)) > TIMESTEP_TOLERANCE:
        raise ConfigError(
            f"--format diffusers: sigma_init {sigma:.6g} is at the fractional timestep {t:.4f}; "
            "a diffusers scheduler steps at integer timesteps only"
        )
    return round(t)


def lcm_settings(source: ExportSource, timestep: int) -> dict[str, Any]:
    """LCMScheduler's arguments for a one-step draw at `timestep`: the generator's noise schedule
    and prediction type, and a timestep scaling under which LCM's boundary condition keeps the
    x0 prediction as it is (diffusers' default 10 does from T = 205 up; below, a larger one).
    Both are checked with diffusers' own formulas, in float32 as the pipeline computes them."""
    kwargs = source.spec.precond_kwargs
    base = {k: kwargs[k] for k in SCHEDULE_KEYS if k in kwargs}
    base["prediction_type"] = source.generator.denoiser.prediction_type
    steps = base.get("num_train_timesteps", 1000)
    base["original_inference_steps"] = min(50, steps)
    base["steps_offset"] = 1  # unused by LCM; SD's pipeline rewrites (and warns about) any other
    if not 0 <= timestep < steps:
        raise ConfigError(f"--format diffusers: timestep {timestep} is outside 0..{steps - 1}")
    at = torch.tensor(timestep)
    for scaling in (10.0, 2.0**12 / max(timestep, 1)):
        scheduler = _diffusers().LCMScheduler(**base, timestep_scaling=scaling)
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(at)
        if float(c_skip) <= ROUNDING and abs(float(c_out) - 1) <= ROUNDING:
            break
    else:
        raise ConfigError(
            f"--format diffusers: at timestep {timestep} LCMScheduler mixes its input into the "
            f"image (c_skip {float(c_skip):.3g}); no one-step scheduler reproduces the generator"
        )
    alpha = float(scheduler.alphas_cumprod[timestep])
    expected = float(source.generator.denoiser.sigmas[timestep])
    if not math.isclose(math.sqrt((1 - alpha) / alpha), expected, rel_tol=1e-4):
        raise ConfigError(
            f"--format diffusers: LCMScheduler's noise schedule differs from the generator's "
            f"at timestep {timestep}"
        )
    return {**base, "timestep_scaling": scaling}


def _source_path(root: Path, rel: str) -> Path:
    """A teacher file the generator names, refused if any part of it below `root` is a link."""
    path = root
    for part in PurePosixPath(rel).parts:
        path = path / part
        if path.is_symlink():
            raise DisbackError(
                f"--pipeline: {path}: is a symbolic link; export copies regular files only "
                "(copy the model folder without links)"
            )
    return path


def _exported_name(rel: str) -> str:
    """A file's name in the pipeline: an fp16 variant of weights under the plain name, which
    `from_pretrained` loads without a variant argument."""
    return rel.replace(".fp16.safetensors", ".safetensors")


def _teacher_files(source: ExportSource) -> tuple[Path, dict[str, str]]:
    t2i = source.info["text_to_image"]
    return Path(source.model_folder or t2i["folder"]), t2i["files"]


def model_index(source: ExportSource) -> dict[str, Any]:
    """The pipeline's model_index.json: the text-to-image pipeline of the teacher's kind, the
    components disback samples with, and SDXL's empty-prompt rule read from the teacher's."""
    root, _ = _teacher_files(source)
    xl = is_xl(source)
    teacher = read_config(root / INDEX, "model_index.json")
    index: dict[str, Any] = {
        "_class_name": PIPELINES[xl],
        "_diffusers_version": _diffusers().__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "LCMScheduler"],
    }
    for component in _components(xl):
        index[component] = COMPONENTS[component]
    index.update({name: [None, None] for name in OPTIONAL[xl]})
    if xl:
        index["force_zeros_for_empty_prompt"] = bool(
            teacher.get("force_zeros_for_empty_prompt", True)
        )
    else:
        index["requires_safety_checker"] = False
    return index


def _components(xl: bool) -> tuple[str, ...]:
    return tuple(c for c in COMPONENTS if xl or not c.endswith("_2"))


def _check_pipeline(source: ExportSource) -> None:
    """The teacher files the pipeline copies: all there, unchanged, not links, every component
    the pipeline needs named."""
    root, files = _teacher_files(source)
    try:
        check_recorded_files(root, files)
    except DisbackError as exc:  # bad input files (exit 1), not bad flags
        raise DisbackError(f"--pipeline: {exc}") from None
    for rel in files:
        _source_path(root, rel)
    named = {rel.split("/")[0] for rel in files}
    missing = [c for c in _components(is_xl(source)) if c not in named]
    if missing:
        raise ConfigError(
            f"--pipeline: the generator file names no {', '.join(missing)} files of the teacher"
        )
    try:
        model_index(source)
    except DisbackError as exc:
        raise ConfigError(f"--pipeline: {exc}") from None


def _verified_blocks(f, size: int, sha256: str, path: Path):
    """The file's `size` bytes in blocks; after the last, a refusal if they (or the file's
    length) are not what the generator recorded, so the writer drops its partial copy."""
    digest, left = hashlib.sha256(), size
    while left:
        block = f.read(min(BLOCK, left))
        if not block:
            raise DisbackError(f"{path}: changed while being copied")
        digest.update(block)
        left -= len(block)
        yield block
    if f.read(1) or digest.hexdigest() != sha256:
        raise DisbackError(f"{path}: not the file the generator was trained with (sha256 differs)")


def copy_verified(root: Path, rel: str, sha256: str, folder: ExportFolder) -> None:
    """Copy one teacher file into the pipeline, streamed and hashed; never through a link."""
    path = _source_path(root, rel)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise DisbackError(f"{path}: cannot read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SAFETENSORS_BYTES:
            raise DisbackError(f"{path}: not a regular model file")
        blocks = _verified_blocks(f, info.st_size, sha256, path)
        folder.write_chunks(_exported_name(rel), info.st_size, blocks)


def write_unet(source: ExportSource, dtype: str, folder: ExportFolder) -> str:
    """unet/ as `save_pretrained` lays it out, the weights cast to `dtype`; their sha256."""
    unet = source.generator.denoiser.model.unet
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    header = {"_class_name": type(unet).__name__, "_diffusers_version": _diffusers().__version__}
    folder.write_json(UNET_CONFIG, {**header, **config})
    chunks = safetensors_chunks(unet.state_dict(), {"format": "pt"}, DTYPES[dtype])
    return folder.write_chunks(UNET_WEIGHTS, *chunks)


def _snippet(source: ExportSource, cfg: ExportConfig, timestep: int, scheduler: dict) -> str:
    """The exact call that draws the generator's images with diffusers."""
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[cfg.dtype]
    steps = f"num_inference_steps=1, timesteps=[{timestep}], guidance_scale=0"
    call = f'pipe("a photo of a cat", {steps})'
    extra = ", add_watermarker=False" if is_xl(source) else ""  # the watermark changes pixels
    if cfg.pipeline:
        load = [
            "from diffusers import DiffusionPipeline",
            "",
            "pipe = DiffusionPipeline.from_pretrained(",
            f'    ".", dtype=torch.{dtype}{extra}  # this folder',
            ")",
        ]
    else:
        teacher, _ = _teacher_files(source)
        load = [
            "from diffusers import DiffusionPipeline, LCMScheduler, UNet2DConditionModel",
            "",
            f'unet = UNet2DConditionModel.from_pretrained("unet", dtype=torch.{dtype})',
            "scheduler = LCMScheduler(",
            *(f"    {key}={value!r}," for key, value in scheduler.items()),
            ")",
            "pipe = DiffusionPipeline.from_pretrained(",
            f"    {str(teacher)!r},  # the teacher's model folder",
            f"    unet=unet, scheduler=scheduler, dtype=torch.{dtype}{extra}",
            ")",
        ]
    return "\n".join(["import torch", *load, f"image = {call}.images[0]", ""])


class DiffusersExport:
    description = (
        "a diffusers UNet folder, or with --pipeline a whole pipeline folder (one step, "
        "LCMScheduler, guidance 0)"
    )

    def check(self, cfg: ExportConfig, source: ExportSource) -> None:
        """Only a generator that reads pure noise at an integer timestep is a diffusers
        pipeline; a pipeline also needs the teacher's files it was trained with."""
        lcm_settings(source, one_step_timestep(source))
        if cfg.pipeline:
            _check_pipeline(source)

    def write(
        self, cfg: ExportConfig, source: ExportSource, folder: ExportFolder, reporter: Reporter
    ) -> Usage:
        timestep = one_step_timestep(source)
        scheduler = lcm_settings(source, timestep)
        sha = write_unet(source, cfg.dtype, folder)
        facts = {
            "unet_sha256": sha,
            "dtype": cfg.dtype,
            "scheduler": "LCMScheduler",
            "timestep": timestep,
            "timestep_scaling": scheduler["timestep_scaling"],
        }
        if cfg.pipeline:
            root, files = _teacher_files(source)
            for rel, sha256 in sorted(files.items()):
                copy_verified(root, rel, sha256, folder)
            config = _diffusers().LCMScheduler(**scheduler).to_json_string()
            folder.write_bytes(SCHEDULER, config.encode())
            index = model_index(source)
            folder.write_json(INDEX, index)
            facts["pipeline"] = index["_class_name"]
        return Usage(snippet=_snippet(source, cfg, timestep, scheduler), facts=facts)
