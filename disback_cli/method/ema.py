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
    ema_params, params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    if len(ema_params) != len(params):
        raise ValueError("EMA and network have different parameter lists")
    # ema <- p + beta (ema - p), the same value as p.lerp(ema, beta), in one fused call
    torch._foreach_lerp_(ema_params, params, 1 - beta)
