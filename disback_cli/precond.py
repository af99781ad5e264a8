"""EDM preconditioning: every network in disback is seen as a denoiser D(x, sigma) -> x0_hat.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Table 1:
D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Denoiser(Protocol):
    """The one interface: teacher, path nodes, fake score and generator all look like this."""

    sigma_data: float
    data_shape: tuple[int, ...]
    label_dim: int

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor: ...


def sigma_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float32 tensor of shape (batch, 1, ..., 1) that broadcasts against x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma.expand(x.shape[0], *sigma.shape[1:]) if sigma.shape[0] == 1 else sigma


class EDMPrecond(nn.Module):
    """EDM preconditioning around a raw network `model(x_in, c_noise, class_labels) -> F`."""

    def __init__(
        self,
        model: nn.Module,                   # Raw network F.
        data_shape: tuple[int, ...],        # Shape of one sample, e.g. (2,) or (3, 32, 32).
        label_dim: int = 0,                 # Number of classes, 0 = unconditional.
        sigma_data: float = 0.5,            # Expected standard deviation of the data.
        sigma_min: float = 0.0,             # Smallest supported noise level.
        sigma_max: float = math.inf,        # Largest supported noise level.
    ) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.data_shape = tuple(data_shape)
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x.to(torch.float32)
        sigma = sigma_like(sigma, x)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        f = self.model(c_in * x, c_noise, class_labels)
        return c_skip * x + c_out * f.to(torch.float32)
