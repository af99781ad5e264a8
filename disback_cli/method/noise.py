"""Noise levels at which denoisers are trained and queried (EDM log-normal, Karras grids)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from disback_cli.config import SigmaKind
from disback_cli.errors import ConfigError
from disback_cli.models.discrete_ddpm import DiscreteSigma

KARRAS_LEVELS = 1000  # DMD2's grid of training noise levels


def sample_lognormal_sigma(
    n: int, p_mean: float, p_std: float, rng: torch.Generator, device: torch.device
) -> torch.Tensor:
    """EDM's training noise levels: ln(sigma) ~ N(p_mean, p_std^2)."""
    return (torch.randn(n, generator=rng, device=device) * p_std + p_mean).exp()


def karras_sigma(
    t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
):
    """EDM's rho-spaced noise levels: t = 0 gives sigma_min, t = 1 gives sigma_max."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


def sample_karras_index_sigma(
    n: int, rng: torch.Generator, device: torch.device, low: int = 0, high: int = KARRAS_LEVELS
) -> torch.Tensor:
    """Noise levels at a uniformly drawn index `low <= i < high` of 1000 Karras levels."""
    index = torch.randint(low, high, (n,), generator=rng, device=device)
    return karras_sigma(index.float() / (KARRAS_LEVELS - 1))


@dataclass(frozen=True)
class TrainingSigma:
    """Where the fake score and the path nodes learn to denoise. Each generator loss queries
    them at its own noise levels, so they are trained there: log-normal for VSD and SiD (as
    Diff-Instruct and SiD train their fake score), DMD2's uniform Karras index for DMD, and a
    discrete-time teacher's own timesteps for text-to-image teachers."""

    kind: SigmaKind
    p_mean: float = -1.2  # log-normal only
    p_std: float = 1.2
    table: torch.Tensor | None = field(default=None, compare=False)  # discrete only

    def sample(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        if self.kind == "karras":
            return sample_karras_index_sigma(n, rng, device)
        if self.kind == "discrete":
            return DiscreteSigma(self.table).sample(n, rng, device)
        return sample_lognormal_sigma(n, self.p_mean, self.p_std, rng, device)

    @classmethod
    def of(cls, cfg, denoiser=None) -> TrainingSigma:
        """From a resolved record or backtrack config (and, for discrete levels, the teacher's
        denoiser, whose timesteps they are)."""
        table = None
        if cfg.dsm_sigma == "discrete":
            table = getattr(denoiser, "sigmas", None)
            if table is None:
                raise ConfigError(
                    "discrete noise levels need a discrete-time (text-to-image) teacher"
                )
        return cls(cfg.dsm_sigma, cfg.p_mean, cfg.p_std, table)
