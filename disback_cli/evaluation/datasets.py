"""Ground-truth data sets of the built-in teachers: what they learned and are judged against."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from disback_cli.errors import DisbackError


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture with equal-variance components; exact samples and denoiser."""

    means: torch.Tensor  # (K, d)
    std: float
    weights: torch.Tensor  # (K,), sums to 1

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.means.shape[1],)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples and their component indices, drawn on the CPU from `generator`."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator)
        return self.means[component] + self.std * noise, component

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """E[x0 | x0 + sigma*eps = x], exact: posterior-weighted per-component Wiener filters."""
        means = self.means.to(x)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        var = self.std**2 + sigma**2  # (B or 1, 1)
        sq_dist = torch.cdist(x, means) ** 2  # (B, K)
        logits = self.weights.to(x).log() - sq_dist / (2 * var)
        resp = logits.softmax(dim=1)  # (B, K)
        shrink = self.std**2 / var  # (B or 1, 1)
        posterior_mean = means + shrink.unsqueeze(-1) * (x.unsqueeze(1) - means)  # (B, K, d)
        return (resp.unsqueeze(-1) * posterior_mean).sum(dim=1)

    @property
    def num_classes(self) -> int:
        return len(self.weights)

    def nearest_mode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of the nearest component mean and the distance to it in units of `std`."""
        dist = torch.cdist(x.to(torch.float64), self.means.to(torch.float64))
        best, index = dist.min(dim=1)
        return index, best / self.std


def ring2d(num_modes: int = 8, radius: float = 2.0, std: float = 0.08) -> GaussianMixture:
    """Eight Gaussians on a circle of radius 2: the classic mode-coverage toy."""
    angle = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return GaussianMixture(means.float(), std, torch.full((num_modes,), 1.0 / num_modes))


@dataclass(frozen=True)
class ImageDataset:
    """Labelled images in [-1, 1] (x / 127.5 - 1), sampled with replacement."""

    images: torch.Tensor  # (N, C, H, W)
    labels: torch.Tensor  # (N,)
    num_classes: int

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.images), (n,), generator=generator)
        return self.images[index], self.labels[index]


def digits_uint8(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The built-in 8x8 digits as uint8 (N, 8, 8, 1) and labels, split 'train' (1000) or
    'heldout' (797). Source: scikit-learn's copy of the UCI digits (scripts/make_digits_data.py)."""
    with resources.files("disback_cli").joinpath("builtin/digits.npz").open("rb") as f:
        data = np.load(io.BytesIO(f.read()))
        index = data[split]
        return data["images"][index][..., None], data["labels"][index]


def digits(split: str = "train") -> ImageDataset:
    images, labels = digits_uint8(split)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return ImageDataset(x, torch.from_numpy(labels), num_classes=10)


def shapes(split: str = "train") -> ImageDataset:
    """The built-in 16x16 shapes (see `evaluation.shapes`): 64 modes, 16 classes."""
    from disback_cli.evaluation import shapes as procedural

    images, labels = procedural.split(split)
    return ImageDataset(images, labels, num_classes=16)


DATASETS = {"ring2d": ring2d, "digits": digits, "shapes": shapes}


def get_dataset(name: str) -> GaussianMixture | ImageDataset:
    try:
        return DATASETS[name]()
    except KeyError:
        raise DisbackError(f"unknown data set {name!r} (known: {', '.join(DATASETS)})") from None
