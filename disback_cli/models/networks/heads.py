"""DMD2's classifier head: a few layers that turn a fake score network's lowest-resolution feature
map into one real-vs-generated logit per sample.

For a map of S x S: 4x4 convolutions of stride 2 halve it until it is at most 4 wide, a last
convolution as wide as what is left brings it to 1 x 1, each followed by GroupNorm and SiLU, and
a 1x1 convolution gives the logit. At DMD2's 8 x 8 (ImageNet-64) and 32 x 32 (SDXL) maps this is
its head layer for layer; vectors (an MLP's hidden layer) get Linear-SiLU-Linear.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_GROUP_CHANNELS = 8


def _groups(channels: int) -> int:
    """GroupNorm's groups: DMD2's 32 (24 channels each at its 768), fewer for narrow networks,
    so that each group keeps at least 8 channels: after the last convolution the map is 1 x 1,
    and a group of one channel there normalises every value to 0 (the layers below it would
    get no gradient)."""
    fits = [g for g in range(1, 33) if channels % g == 0 and channels // g >= MIN_GROUP_CHANNELS]
    return max(fits, default=1)


class ClassifierHead(nn.Module):
    """Feature map (batch, C, S, S) or features (batch, C) -> logits (batch,)."""

    def __init__(self, feature_shape: tuple[int, ...]) -> None:
        super().__init__()
        channels = feature_shape[0]
        if len(feature_shape) == 1:
            self.layers = nn.Sequential(
                nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1)
            )
            return
        size, layers = feature_shape[-1], []
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1)]
            layers += [nn.GroupNorm(_groups(channels), channels), nn.SiLU()]
            size //= 2
        layers += [nn.Conv2d(channels, channels, size, stride=size)]
        layers += [nn.GroupNorm(_groups(channels), channels), nn.SiLU()]
        layers += [nn.Conv2d(channels, 1, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).flatten(1).mean(dim=1)
