"""The one-step generator: a denoiser used as the map z -> D(sigma_init z, sigma_init)."""

from __future__ import annotations

import torch
from torch import nn


class OneStepGenerator(nn.Module):
    """G(z) = D(sigma_init * z, sigma_init), the initialisation of Diff-Instruct, SiD and DMD."""

    def __init__(self, denoiser: nn.Module, sigma_init: float) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = sigma_init

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoiser(z * self.sigma_init, self.sigma_init, class_labels)
