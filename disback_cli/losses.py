"""Denoising score matching and the generator losses of score distillation.

Generator losses are plug-ins: each samples its own noise levels and turns the fake and target
denoisers' opinions about a noised generator sample into a scalar whose gradient moves the
generator. The training loop only sees `GeneratorLoss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from disback_cli.errors import DisbackError
from disback_cli.parallel import Execution
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


def clip_gradients(parameters, clip: float = math.inf) -> torch.Tensor:
    """Total gradient norm (logged, and watched by the divergence guard), clipping to `clip`;
    without a finite `clip` the gradients are left untouched rather than multiplied by 1."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if math.isfinite(clip):
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


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
    ex: Execution | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDM denoising step of `denoiser` on fresh samples of `generator` (not trained here).

    Fits the auxiliary model to G0 while recording and the fake score to G while backtracking.
    `shape` is this rank's batch; the random numbers are drawn for the global batch (see
    `parallel`). Returns the loss and the gradient norm (before clipping to `clip`).
    """
    ex = ex or Execution(rng.device)
    device = rng.device
    n = ex.global_batch(shape[0])
    z = ex.local(torch.randn((n, *shape[1:]), generator=rng, device=device))
    labels = ex.local(draw_labels(n, label_dim, rng, device))
    sigma = ex.local(sample_lognormal_sigma(n, p_mean, p_std, rng, device))
    noise = ex.local(torch.randn((n, *shape[1:]), generator=rng, device=device))
    with ex.autocast():
        with torch.no_grad():
            x0 = generator(ex.to_input(z), labels)
        loss = edm_denoising_loss(denoiser, x0, sigma, ex.to_input(noise), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ex.average_gradients(denoiser.parameters())
    grad_norm = clip_gradients(denoiser.parameters(), clip)
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


def karras_sigma(
    t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
):
    """EDM's rho-spaced noise levels: t = 0 gives sigma_min, t = 1 gives sigma_max."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + t * (hi - lo)) ** rho


class VSDLoss:
    """Variational score distillation as in Diff-Instruct.

    The gradient with respect to the generator sample x is (D_fake - D_target)(x_t, sigma) at
    x_t = x + sigma n, with weight 1 in denoiser space (sigma^2 in score space); sigma is drawn
    from EDM's log-normal training distribution.
    """

    def __init__(self, p_mean: float, p_std: float) -> None:
        self.p_mean, self.p_std = p_mean, p_std

    @classmethod
    def from_config(cls, cfg) -> VSDLoss:
        return cls(cfg.p_mean, cfg.p_std)

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return sample_lognormal_sigma(n, self.p_mean, self.p_std, rng, device)

    def __call__(self, x, sigma, noise, fake, target, class_labels) -> GeneratorLossOutput:
        with torch.no_grad():
            x_t = x + sigma_like(sigma, x) * noise
            gap = fake(x_t, sigma, class_labels) - target(x_t, sigma, class_labels)
        loss = (gap * x).flatten(1).sum(dim=1).mean()
        return GeneratorLossOutput(loss, gap.abs().mean())


class DMDLoss:
    """Distribution matching distillation (DMD / DMD2): the VSD direction normalised per sample by
    mean |x - D_target(x_t)|; sigma uniform over the 2 %..98 % indices of 1000 Karras levels."""

    def __init__(self, low: float = 0.02, high: float = 0.98) -> None:
        self.low, self.high = low, high

    @classmethod
    def from_config(cls, cfg) -> DMDLoss:
        return cls()

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        index = torch.randint(int(self.low * 1000), int(self.high * 1000), (n,), generator=rng,
                              device=device)  # fmt: skip
        return karras_sigma(index.float() / 999)

    def __call__(self, x, sigma, noise, fake, target, class_labels) -> GeneratorLossOutput:
        with torch.no_grad():
            x_t = x + sigma_like(sigma, x) * noise
            d_target = target(x_t, sigma, class_labels)
            gap = fake(x_t, sigma, class_labels) - d_target
            scale = (x - d_target).abs().flatten(1).mean(dim=1).clamp(min=1e-5)
            direction = gap / sigma_like(scale, x)
        loss = 0.5 * ((x - (x - direction).detach()) ** 2).flatten(1).sum(dim=1).mean()
        return GeneratorLossOutput(loss, gap.abs().mean())


class SiDLoss:
    """Score identity distillation (Zhou et al. 2024): per sample
    (D_t - D_f) . ((D_t - x) - alpha (D_t - D_f)) / mean |x - D_t|, differentiated through x_t and
    both denoisers' inputs; t ~ U(0, 0.8) on EDM's rho grid (sigma up to about 24)."""

    def __init__(self, alpha: float = 1.2, t_max: float = 0.8) -> None:
        self.alpha, self.t_max = alpha, t_max

    @classmethod
    def from_config(cls, cfg) -> SiDLoss:
        return cls(alpha=cfg.sid_alpha)

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return karras_sigma(torch.rand(n, generator=rng, device=device) * self.t_max)

    def __call__(self, x, sigma, noise, fake, target, class_labels) -> GeneratorLossOutput:
        x_t = x + sigma_like(sigma, x) * noise
        trainable = [p for p in fake.parameters() if p.requires_grad]
        for p in trainable:  # gradients flow through the fake score's input, not its weights
            p.requires_grad_(False)
        try:
            d_fake = fake(x_t, sigma, class_labels)
            d_target = target(x_t, sigma, class_labels)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        diff = d_target - d_fake
        scale = (x - d_target).detach().abs().flatten(1).mean(dim=1).clamp(min=1e-5)
        per_sample = (diff * ((d_target - x) - self.alpha * diff)).flatten(1).sum(dim=1)
        return GeneratorLossOutput((per_sample / scale).mean(), diff.detach().abs().mean())


GENERATOR_LOSSES: dict[str, type] = {"vsd": VSDLoss, "dmd": DMDLoss, "sid": SiDLoss}


def make_generator_loss(cfg) -> GeneratorLoss:
    """The loss named by `cfg.loss`, built from the fields of the config it needs."""
    if cfg.loss not in GENERATOR_LOSSES:
        raise DisbackError(f"unknown loss {cfg.loss!r} (known: {', '.join(GENERATOR_LOSSES)})")
    return GENERATOR_LOSSES[cfg.loss].from_config(cfg)
