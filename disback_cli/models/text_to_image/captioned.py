"""Real data for a text-to-image teacher's discriminator (`backtrack --adversary`): images as
VAE latents, each with its caption.

`--data FILE.safetensors` holds a tensor `latents` (N, C, h, w), already multiplied by the VAE's
scaling factor (what the UNet denoises; the shape must be the teacher's latent shape), and in its
metadata `captions`, a JSON list of N strings. A batch is drawn from the run's stream and its
captions are encoded as the prompts are (`text.TextEncoder`). The file's sha256 identifies the
data in the manifest. README ("Adversarial terms") shows how to make one with diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from disback_cli.errors import ConfigError
from disback_cli.models.conditioning import Conditioning
from disback_cli.store.fileio import parse_json
from disback_cli.store.tensorfile import check_finite, read_safetensors

if TYPE_CHECKING:
    from disback_cli.method.data import DataSource

MAX_CAPTION_CHARS = 10_000


def open_captioned_latents(spec: str, latent_shape: tuple[int, ...], encoder) -> DataSource:
    """The latents file `spec`, checked (shape, finite, one caption each), or a one-line
    refusal; `encoder` turns captions into the UNet's conditions."""
    from disback_cli.method.data import DataRef, DataSource  # method.data imports the models

    path = Path(spec)
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(
            f"--data {spec}: a text-to-image teacher learns from a .safetensors file of VAE "
            "latents with their captions (README: Adversarial terms)"
        )
    tensors, metadata, digest = read_safetensors(path)
    latents = tensors.get("latents")
    if set(tensors) != {"latents"} or not latents.is_floating_point():
        raise ConfigError(f"--data {spec}: expected one floating tensor named 'latents'")
    if latents.ndim != 4 or tuple(latents.shape[1:]) != tuple(latent_shape):
        raise ConfigError(
            f"--data {spec}: latents of shape {tuple(latents.shape[1:])}, the teacher's are "
            f"{tuple(latent_shape)} (encode the images at the teacher's resolution)"
        )
    check_finite(tensors, spec)
    try:
        captions = parse_json(metadata.get("captions", "null"))
    except ValueError:
        captions = None
    if not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise ConfigError(f"--data {spec}: metadata 'captions' must be a JSON list of strings")
    if len(captions) != len(latents) or len(latents) < 2:
        raise ConfigError(
            f"--data {spec}: {len(latents)} latents and {len(captions)} captions (at least 2, "
            "one each)"
        )
    if any(len(c) > MAX_CAPTION_CHARS for c in captions):
        raise ConfigError(f"--data {spec}: a caption is longer than {MAX_CAPTION_CHARS} characters")
    latents = latents.float()

    def read(index: list[int]) -> tuple[torch.Tensor, Conditioning]:
        return latents[index], encoder.encode([captions[i] for i in index])

    ref = DataRef(str(path.absolute()), digest, len(latents))
    return DataSource(ref, len(latents), read, 0, conditioned=True)
