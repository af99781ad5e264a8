"""Denoising score matching and the generator losses of score distillation.

Generator losses are plug-ins: each samples its own noise levels and turns the fake and target
denoisers' opinions about a noised generator sample into a scalar whose gradient moves the
generator. The training loop only sees `GeneratorLoss`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from disback_cli.errors import DisbackError
from disback_cli.precond import Denoiser, sigma_like
from disback_cli.sampling import draw_labels


def sample_lognormal_sigma(
    n: int, p_mean: float, p_std: float, rng: torch.Generator, device: torch.device
) -> torch.Tensor:
    """EDM's training noise levels: ln(sigma) ~ N(p_mean, p_std^2)."""
    return (torch.randn(n, generator=rng, device=device) * p_std + p_mean).exp()


def edm_denoising_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """EDM loss: lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2, lambda = (s^2+sd^2)/(s sd)^2."""
    sigma = sigma_like(sigma, x0)
    sd = denoiser.sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised = denoiser(x0 + sigma * noise, sigma, class_labels)
    return (weight * (denoised - x0) ** 2).mean()


def denoising_step(
    denoiser: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.nn.Module,
    shape: tuple[int, ...],
    label_dim: int,
    p_mean: float,
    p_std: float,
    rng: torch.Generator,
    clip: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDM denoising step of `denoiser` on fresh samples of `generator` (not trained here).

    Fits the auxiliary model to G0 while recording and the fake score to G while backtracking.
    Returns the loss and the gradient norm (before clipping to `clip`).
    """
    device = rng.device
    z = torch.randn(shape, generator=rng, device=device)
    labels = draw_labels(shape[0], label_dim, rng, device)
    with torch.no_grad():
        x0 = generator(z, labels)
    sigma = sample_lognormal_sigma(shape[0], p_mean, p_std, rng, device)
    noise = torch.randn(shape, generator=rng, device=device)
    loss = edm_denoising_loss(denoiser, x0, sigma, noise, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), clip)
    optimizer.step()
    return loss.detach(), grad_norm


@dataclass
class GeneratorLossOutput:
    loss: torch.Tensor  # scalar to back-propagate into the generator
    score_gap: torch.Tensor  # mean |D_fake - D_target| on this batch (detached), for the logs


class GeneratorLoss(Protocol):
    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor: ...

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        fake: Denoiser,
        target: Denoiser,
        class_labels: torch.Tensor | None,
    ) -> GeneratorLossOutput: ...


class VSDLoss:
    """Variational score distillation as in Diff-Instruct.

    The gradient with respect to the generator sample x is (D_fake - D_target)(x_t, sigma) at
    x_t = x + sigma n, with weight 1 in denoiser space (sigma^2 in score space); sigma is drawn
    from EDM's log-normal training distribution.
    """

    def __init__(self, p_mean: float, p_std: float) -> None:
        self.p_mean, self.p_std = p_mean, p_std

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return sample_lognormal_sigma(n, self.p_mean, self.p_std, rng, device)

    def __call__(self, x, sigma, noise, fake, target, class_labels) -> GeneratorLossOutput:
        with torch.no_grad():
            x_t = x + sigma_like(sigma, x) * noise
            gap = fake(x_t, sigma, class_labels) - target(x_t, sigma, class_labels)
        loss = (gap * x).flatten(1).sum(dim=1).mean()
        return GeneratorLossOutput(loss, gap.abs().mean())


GENERATOR_LOSSES: dict[str, Callable[..., GeneratorLoss]] = {"vsd": VSDLoss}


def make_generator_loss(name: str, **kwargs) -> GeneratorLoss:
    if name not in GENERATOR_LOSSES:
        raise DisbackError(f"unknown loss {name!r} (known: {', '.join(GENERATOR_LOSSES)})")
    return GENERATOR_LOSSES[name](**kwargs)
