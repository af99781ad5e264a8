"""A small MLP network F(x, c_noise) for vector data (the 2-D built-in teacher)."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected SiLU network; noise level enters as sin/cos features, labels as one-hot."""

    def __init__(
        self,
        data_shape: tuple[int, ...],  # Shape of one sample.
        label_dim: int = 0,  # Number of classes, 0 = unconditional.
        hidden: int = 128,  # Width of every hidden layer.
        depth: int = 3,  # Number of hidden layers.
        noise_features: int = 8,  # Sin/cos features of c_noise (even).
    ) -> None:
        super().__init__()
        self.dim = math.prod(data_shape)
        self.register_buffer(
            "noise_freqs", 2.0 ** torch.arange(noise_features // 2, dtype=torch.float32)
        )
        layers: list[nn.Module] = []
        width = self.dim + noise_features + label_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, self.dim))
        self.layers = nn.Sequential(*layers)

    feature_points = ("hidden",)  # where a discriminator head can read it: the last hidden layer

    def _inputs(self, x, noise_labels, class_labels) -> torch.Tensor:
        phase = noise_labels.reshape(-1, 1) * self.noise_freqs
        parts = [x.reshape(x.shape[0], -1), phase.sin(), phase.cos()]
        if class_labels is not None:
            parts.append(class_labels.to(x.dtype))
        return torch.cat(parts, dim=1)

    def features(self, x, noise_labels, class_labels=None, where: str = "hidden") -> torch.Tensor:
        """The last hidden layer's activations (`method.adversarial` reads them)."""
        return self.layers[:-1](self._inputs(x, noise_labels, class_labels))

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.layers(self._inputs(x, noise_labels, class_labels)).reshape(x.shape)
