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
        self, x: torch.Tensor, sigma: torch.Tensor | float, **cond: torch.Tensor
    ) -> torch.Tensor: ...


def sigma_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Sigma as a float32 tensor of shape (batch, 1, ..., 1) that broadcasts against x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return sigma.expand(x.shape[0], *sigma.shape[1:]) if sigma.shape[0] == 1 else sigma


class Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) around a raw network `model`.

    Subclasses give the coefficients. With `use_fp16` the raw network runs in bf16 on CUDA (EDM
    used fp16, which diverges in distillation); on the CPU it always runs in float32.
    """

    sigma_data: float = 0.5  # data scale; also sets the weighting of the denoising loss

    def __init__(
        self,
        model: nn.Module,  # Raw network F(x, c_noise, class_labels).
        data_shape: tuple[int, ...],  # Shape of one sample, e.g. (2,) or (3, 32, 32).
        label_dim: int = 0,  # Number of classes, 0 = unconditional.
        use_fp16: bool = False,  # Run F in bf16 on CUDA?
    ) -> None:
        super().__init__()
        self.model = model
        self.data_shape = tuple(data_shape)
        self.label_dim = label_dim
        self.use_fp16 = use_fp16

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (batch, 1, ..., 1)."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        features_at: str | None = None,
        **cond: torch.Tensor,
    ) -> torch.Tensor:
        """`cond` beyond class labels (see `conditioning`) goes to the raw network as keywords.
        With `features_at`, the raw network's feature map there instead (`features`)."""
        x, sigma, class_labels, dtype = self._inputs(x, sigma, class_labels)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        x_in, labels = (c_in * x).to(dtype), c_noise.flatten()
        if features_at is not None:
            return self.model.features(x_in, labels, class_labels, features_at, **cond).float()
        f = self.model(x_in, labels, class_labels, **cond)
        return c_skip * x + c_out * f.to(torch.float32)

    def features(
        self,
        x: torch.Tensor,
        sigma,
        where: str,
        class_labels: torch.Tensor | None = None,
        **cond: torch.Tensor,
    ) -> torch.Tensor:
        """The raw network's feature map at `where` (one of its `feature_points`) for D's input:
        what a discriminator head reads (`method.adversarial`). Through the module's call, so
        that what wraps it (FSDP's gathering) sees it."""
        return self(x, sigma, class_labels, features_at=where, **cond)

    def _inputs(self, x, sigma, class_labels) -> tuple:
        x = x.to(torch.float32)
        sigma = sigma_like(sigma, x)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        elif class_labels is not None:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.bfloat16 if self.use_fp16 and x.device.type == "cuda" else torch.float32
        return x, sigma, class_labels, dtype


class EDMPrecond(Precond):
    """Karras et al. 2022, Table 1: unit-variance network input and target at every sigma."""

    def __init__(
        self,
        model: nn.Module,
        data_shape: tuple[int, ...],
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_data: float = 0.5,  # Expected standard deviation of the data.
        sigma_min: float = 0.0,  # Smallest supported noise level.
        sigma_max: float = math.inf,  # Largest supported noise level.
    ) -> None:
        super().__init__(model, data_shape, label_dim, use_fp16)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


class VPPrecond(Precond):
    """Variance preserving (DDPM++ of Song et al. 2021): F predicts the scaled noise."""

    def __init__(
        self,
        model: nn.Module,
        data_shape: tuple[int, ...],
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,  # Extent of the noise level schedule.
        beta_min: float = 0.1,  # Initial slope of the noise level schedule.
        M: int = 1000,  # Number of timesteps in the DDPM formulation.
        epsilon_t: float = 1e-5,  # Smallest t used in training.
    ) -> None:
        super().__init__(model, data_shape, label_dim, use_fp16)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        cpu = dict(device="cpu")  # explicit: networks may be built on the meta device
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, **cpu)))
        self.sigma_max = float(self.sigma(torch.tensor(1, **cpu)))

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        t = t if torch.is_tensor(t) else torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        root = (self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt()
        return (root - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        c_in = 1 / (sigma**2 + 1).sqrt()
        return 1, -sigma, c_in, (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
    """Variance exploding (NCSN++ of Song et al. 2021): F predicts the noise direction."""

    def __init__(
        self,
        model: nn.Module,
        data_shape: tuple[int, ...],
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,  # Smallest supported noise level.
        sigma_max: float = 100.0,  # Largest supported noise level.
    ) -> None:
        super().__init__(model, data_shape, label_dim, use_fp16)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma: torch.Tensor) -> tuple:
        return 1, sigma, 1, (0.5 * sigma).log()
