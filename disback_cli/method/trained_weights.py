"""What of the generator and the fake score trains in `backtrack`, chosen once (`trained_weights`).

* every weight (the default): the optimisers step the whole networks, resume points keep them;
* `--lora-rank R` (DMD2's `--generator_lora`): the networks stay frozen and rank-R adapters on
  their attention projections train (peft, alpha = R, B = 0 so that iteration 0 is G0 and node
  N exactly). Only the adapters have gradients, Adam moments and an EMA, and only they go into
  resume points; the generator's EMA shares its frozen weights. An SDXL backtrack then holds
  four UNets (generator, fake score, target, next node) instead of eleven: the single-GPU way.
  The generator files `sample` reads hold plain weights, the adapters merged in.
"""

from __future__ import annotations

import copy
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


class LowRankAdapters:
    """Rank-R adapters on frozen networks (`--lora-rank R`)."""

    generator_copies: ClassVar[dict[str, float]] = {"generator (frozen; adapters train)": 1}
    fake_copies: ClassVar[dict[str, float]] = {"fake score (frozen; adapters train)": 1}

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def trained(self, network: nn.Module, seed: int) -> nn.Module:
        """Adapters added to `network` (A drawn from `seed`): their factors train, nothing else."""
        from disback_cli.models.text_to_image.lora import LoraFactors, add_lora

        add_lora(network, self.rank, seed)
        return LoraFactors(network)

    def ema_of(self, generator: nn.Module, copy_denoiser) -> nn.Module:
        """A copy of the adapted generator that shares its frozen weights (the average of a
        constant is the constant): only the adapters are copied."""
        frozen = {id(p): p for name, p in generator.named_parameters() if "lora_" not in name}
        return copy.deepcopy(generator, frozen)

    def kept(self, ema: nn.Module) -> nn.Module:
        from disback_cli.models.text_to_image.lora import LoraFactors

        return LoraFactors(ema)

    def plain(self, denoiser: nn.Module) -> Mapping[str, torch.Tensor]:
        """Its plain weights, each adapted one merged as the file writer reads it."""
        from disback_cli.models.text_to_image.lora import MergedWeights

        return MergedWeights(denoiser)


def trained_weights(cfg) -> AllWeights | LowRankAdapters:
    """The run's choice: adapters when `--lora-rank` is given, else every weight."""
    return LowRankAdapters(cfg.lora_rank) if getattr(cfg, "lora_rank", None) else AllWeights()
