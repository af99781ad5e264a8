"""Classifier-free guidance of a denoiser (Ho & Salimans 2022), as DMD2 and the DisBack SDXL
release apply it to the real score: D_w = D(x | uncond) + w (D(x | cond) - D(x | uncond)). The
fake score is unguided unless `--fake-guidance-scale` asks otherwise (SiD-LSG guides it in its
training and in the generator loss). Conditions carry their unconditional twins under `uncond_*`
names (see `models.text_to_image.text`); keys without a twin (SDXL's time ids) are shared."""

from __future__ import annotations

import torch
from torch import nn

from disback_cli.errors import ConfigError
from disback_cli.models.text_to_image.unet import UNCOND_PREFIX


class Guided(nn.Module):
    """`denoiser` with classifier-free guidance at `scale`, evaluated as one batch of
    [unconditional; conditional] inputs."""

    def __init__(self, denoiser: nn.Module, scale: float) -> None:
        super().__init__()
        self.denoiser, self.scale = denoiser, scale
        for name in (
            "sigma_data",
            "data_shape",
            "label_dim",
            "sigma_min",
            "sigma_max",
            "loss_weight",  # a guided fake score trains with its network's own loss
        ):
            if hasattr(denoiser, name):
                setattr(self, name, getattr(denoiser, name))

    def forward(self, x: torch.Tensor, sigma, **cond: torch.Tensor) -> torch.Tensor:
        names = [k for k in cond if not k.startswith(UNCOND_PREFIX)]
        if not any(UNCOND_PREFIX + k in cond for k in names):
            raise ConfigError("classifier-free guidance needs unconditional embeddings")
        both = {k: torch.cat([cond.get(UNCOND_PREFIX + k, cond[k]), cond[k]]) for k in names}
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
        sigma = sigma.expand(len(x)) if len(sigma) == 1 else sigma
        uncond, conditional = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), **both
        ).chunk(2)
        return uncond + self.scale * (conditional - uncond)


def guided(denoiser: nn.Module, scale: float | None) -> nn.Module:
    """The denoiser guided at `scale`; itself at scale 1 (or none): no extra evaluation."""
    return denoiser if scale is None or scale == 1 else Guided(denoiser, scale)
