"""Denoising score matching and the generator losses of score distillation.

Generator losses are plug-ins: each samples its own noise levels and turns the fake and target
denoisers' opinions about a noised generator sample into a scalar whose gradient moves the
generator. The training loop only sees `GeneratorLoss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from disback_cli.errors import DisbackError
from disback_cli.networks import eval_mode
from disback_cli.parallel import Execution
from disback_cli.precond import Denoiser, sigma_like
from disback_cli.sampling import draw_labels

SigmaKind = Literal["lognormal", "karras"]
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
    Diff-Instruct and SiD train their fake score), DMD2's uniform Karras index for DMD."""

    kind: SigmaKind
    p_mean: float = -1.2  # log-normal only
    p_std: float = 1.2

    def sample(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        if self.kind == "karras":
            return sample_karras_index_sigma(n, rng, device)
        return sample_lognormal_sigma(n, self.p_mean, self.p_std, rng, device)

    @classmethod
    def of(cls, cfg) -> TrainingSigma:
        """From a resolved record or backtrack config."""
        return cls(cfg.dsm_sigma, cfg.p_mean, cfg.p_std)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (DMD2's 1/sigma^2 + 1/sd^2)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_denoising_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """EDM loss: lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2 (lambda: `edm_loss_weight`)."""
    sigma = sigma_like(sigma, x0)
    weight = edm_loss_weight(sigma, denoiser.sigma_data)
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
    levels: TrainingSigma,
    rng: torch.Generator,
    clip: float = math.inf,
    ex: Execution | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDM denoising step of `denoiser` on fresh samples of `generator` (not trained here).

    Fits the auxiliary model to G0 while recording and the fake score to G while backtracking.
    The samples come from the generator in eval mode, as `disback sample` draws them (SiD and
    Diff-Instruct do the same), so dropout in a generator being trained does not leak into
    what the fake score learns. `shape` is this rank's batch; the random numbers are drawn for
    the global batch (see `parallel`). Returns the loss and the gradient norm (before clipping).
    """
    ex = ex or Execution(rng.device)
    device = rng.device
    n = ex.global_batch(shape[0])
    z = ex.local(torch.randn((n, *shape[1:]), generator=rng, device=device))
    labels = ex.local(draw_labels(n, label_dim, rng, device))
    sigma = ex.local(levels.sample(n, rng, device))
    noise = ex.local(torch.randn((n, *shape[1:]), generator=rng, device=device))
    with ex.autocast():
        with torch.no_grad(), eval_mode(generator):
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
    mean |x - D_target(x_t)|; sigma uniform over the 2 %..98 % indices of 1000 Karras levels.
    The loss is DMD2's `0.5 * mse_loss(x, sg(x - grad), reduction="mean")`: a mean over every
    element, so DMD2's gradient clipping (10 on ImageNet) means the same here."""

    def __init__(self, low: float = 0.02, high: float = 0.98) -> None:
        self.low, self.high = low, high

    @classmethod
    def from_config(cls, cfg) -> DMDLoss:
        return cls()

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        low, high = round(self.low * KARRAS_LEVELS), round(self.high * KARRAS_LEVELS)
        return sample_karras_index_sigma(n, rng, device, low, high)

    def __call__(self, x, sigma, noise, fake, target, class_labels) -> GeneratorLossOutput:
        with torch.no_grad():
            x_t = x + sigma_like(sigma, x) * noise
            d_target = target(x_t, sigma, class_labels)
            gap = fake(x_t, sigma, class_labels) - d_target
            scale = (x - d_target).abs().flatten(1).mean(dim=1).clamp(min=1e-5)
            direction = gap / sigma_like(scale, x)
        loss = 0.5 * ((x - (x - direction).detach()) ** 2).mean()
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
        try:  # each reads its own copy of x_t: their input gradients then meet in a single
            # sum, which is exactly zero when fake = target (interleaved, it leaves rounding)
            d_fake = fake(x_t.clone(), sigma, class_labels)
            d_target = target(x_t.clone(), sigma, class_labels)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        diff = d_target - d_fake
        scale = (x - d_target).detach().abs().flatten(1).mean(dim=1).clamp(min=1e-5)
        per_sample = (diff * ((d_target - x) - self.alpha * diff)).flatten(1).sum(dim=1)
        return GeneratorLossOutput((per_sample / scale).mean(), diff.detach().abs().mean())


GENERATOR_LOSSES: dict[str, type] = {"vsd": VSDLoss, "dmd": DMDLoss, "sid": SiDLoss}
# The noise levels each loss's reference trains its fake score at (Diff-Instruct, DMD2, SiD).
LOSS_TRAINING_SIGMA: dict[str, SigmaKind] = {
    "vsd": "lognormal", "dmd": "karras", "sid": "lognormal"
}  # fmt: skip


def make_generator_loss(cfg) -> GeneratorLoss:
    """The loss named by `cfg.loss`, built from the fields of the config it needs."""
    if cfg.loss not in GENERATOR_LOSSES:
        raise DisbackError(f"unknown loss {cfg.loss!r} (known: {', '.join(GENERATOR_LOSSES)})")
    return GENERATOR_LOSSES[cfg.loss].from_config(cfg)
