"""The VAE that turns latents into images (for `sample`): built from its config and loaded
strictly from safetensors, run in float32 (SDXL's VAE overflows in half precision)."""

from __future__ import annotations

import torch
from torch import nn

from disback_cli.errors import DisbackError, summary_of
from disback_cli.models.components import build_checked
from disback_cli.models.text_to_image.folder import DiffusersFolder
from disback_cli.models.text_to_image.unet import _diffusers
from disback_cli.store.tensorfile import check_finite, read_safetensors

# Attention weights under the names diffusers used before 0.14 (still in some SD 1.x files).
_OLD_ATTENTION = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def _renamed(name: str) -> str:
    for old, new in _OLD_ATTENTION.items():
        name = name.replace(old, new)
    return name


def _factor(folder: DiffusersFolder, key: str, default: float) -> float:
    value = folder.vae.get(key)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1e3 < value < 1e3:
        raise DisbackError(
            f"{folder.root / 'vae' / 'config.json'}: {key} {value!r:.40} is not a "
            "number of sensible size"
        )
    if key == "scaling_factor" and value == 0:
        raise DisbackError(f"{folder.root / 'vae' / 'config.json'}: scaling_factor is 0")
    return float(value)


class LatentDecoder(nn.Module):
    """Scaled latents x (what the UNet denoises) -> images in [-1, 1]: VAE.decode(x / s)."""

    def __init__(self, folder: DiffusersFolder, device) -> None:
        super().__init__()
        tensors, _, _ = read_safetensors(folder.weights["vae"], verify=False)
        check_finite(tensors, folder.weights["vae"])
        tensors = {_renamed(k): v.float() for k, v in tensors.items()}
        build = _diffusers().AutoencoderKL.from_config
        self.vae = build_checked(lambda: build(folder.vae), folder.root / "vae", "VAE", tensors)
        try:
            self.vae.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            first = summary_of(exc)
            raise DisbackError(f"{folder.weights['vae']}: weights do not match ({first})") from None
        self.scaling_factor = _factor(folder, "scaling_factor", 0.18215)
        self.shift_factor = _factor(folder, "shift_factor", 0.0)
        self.vae.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1, 1)
