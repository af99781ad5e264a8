"""What of the generator and the fake score trains in `backtrack`: an object the teacher's family
chooses once (`TeacherFamily.trained_weights`).

* every weight (`AllWeights`, here, the default): the optimisers step the whole networks, and
  resume points keep them;
* `--lora-rank R` (text-to-image teachers: `text_to_image.lora.LowRankAdapters`): the networks
  stay frozen and rank-R adapters train, the single-GPU way to backtrack SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn


class AllWeights:
    """Every weight of the generator and of the fake score trains."""

    generator_copies: ClassVar[dict[str, float]] = {
        "generator": 1,
        "generator gradient": 1,
        "generator Adam moments": 2,
        "generator EMA": 1,
    }
    fake_copies: ClassVar[dict[str, float]] = {
        "fake score": 1,
        "fake-score gradient": 1,
        "fake-score Adam moments": 2,
    }

    def trained(self, network: nn.Module, seed: int) -> nn.Module:
        """What of `network` its optimiser steps and a resume point keeps (here: all of it)."""
        return network

    def ema_of(self, generator: nn.Module, copy_denoiser) -> nn.Module:
        """The generator's EMA, a copy of it (`copy_denoiser` copies its denoiser as the run's
        layout makes copies)."""
        return type(generator)(
            copy_denoiser(generator.denoiser), generator.sigma_init, generator.input_scale
        )

    def kept(self, ema: nn.Module) -> nn.Module:
        """What a resume point keeps of the EMA."""
        return ema

    def plain(self, denoiser: nn.Module) -> nn.Module | Mapping[str, torch.Tensor]:
        """The denoiser as a generator file holds it (a module, or its tensors by name)."""
        return denoiser


ALL_WEIGHTS = AllWeights()
