"""The VAE that turns latents into images (for `sample`): built from its config and loaded
strictly from safetensors, run in float32 (SDXL's VAE overflows in half precision)."""

from __future__ import annotations

import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.text_to_image.folder import DiffusersFolder
from disback_cli.models.text_to_image.unet import _diffusers
from disback_cli.store.tensorfile import read_safetensors

# Attention weights under the names diffusers used before 0.14 (still in some SD 1.x files).
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                  ".proj_attn.": ".to_out.0."}  # fmt: skip


def _renamed(name: str) -> str:
    for old, new in _OLD_ATTENTION.items():
        name = name.replace(old, new)
    return name


class LatentDecoder(nn.Module):
    """Scaled latents x (what the UNet denoises) -> images in [-1, 1]: VAE.decode(x / s)."""

    def __init__(self, folder: DiffusersFolder, device) -> None:
        super().__init__()
        tensors, _, _ = read_safetensors(folder.weights["vae"], verify=False)
        with torch.random.fork_rng(devices=[]):
            self.vae = _diffusers().AutoencoderKL.from_config(folder.vae)
        tensors = {_renamed(k): v.float() for k, v in tensors.items()}
        try:
            self.vae.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise DisbackError(f"{folder.weights['vae']}: weights do not match ({first})") from None
        self.scaling_factor = float(folder.vae.get("scaling_factor", 0.18215))
        self.shift_factor = float(folder.vae.get("shift_factor") or 0.0)
        self.vae.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1, 1)
