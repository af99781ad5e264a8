"""Exponential moving average of the generator with EDM's half-life in images and ramp-up."""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int, images_seen: int, halflife_kimg: float, rampup: float | None) -> float:
    """Decay per step so that the average halves every `halflife_kimg` thousand images.

    With `rampup`, the half-life is at most `rampup` times the images seen so far, so short runs
    are not dominated by the initial weights.
    """
    halflife = halflife_kimg * 1000
    if rampup is not None:
        halflife = min(halflife, images_seen * rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
