"""The generator losses of score distillation, and the generator step that uses them.

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
from disback_cli.method.dsm import apply_gradients, generator_inputs
from disback_cli.method.noise import (
    KARRAS_LEVELS,
    SigmaKind,
    karras_sigma,
    sample_karras_index_sigma,
    sample_lognormal_sigma,
)
from disback_cli.method.ratio import score_difference
from disback_cli.models.conditioning import Conditioning, ConditionSource
from disback_cli.models.networks import eval_mode
from disback_cli.models.precond import Denoiser, sigma_like
from disback_cli.runtime.parallel import Execution


@dataclass
class GeneratorLossOutput:
    loss: torch.Tensor  # scalar to back-propagate into the generator
    score_gap: torch.Tensor  # mean |D_fake - D_target| on this batch (detached), for the logs
    sample_scale: torch.Tensor | None = None  # a loss's per-sample normaliser (SiD's), if any


class GeneratorLoss(Protocol):
    fake_side: str  # the fake network it works with (`fake_sides.FAKE_SIDES`)

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor: ...

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        fake: Denoiser,
        target: Denoiser,
        cond: Conditioning,
    ) -> GeneratorLossOutput: ...


class VSDLoss:
    """Variational score distillation as in Diff-Instruct.

    The gradient with respect to the generator sample x is (D_fake - D_target)(x_t, sigma) at
    x_t = x + sigma n, with weight 1 in denoiser space (sigma^2 in score space); sigma is drawn
    from EDM's log-normal training distribution.
    """

    fake_side = "score"
    # Per-sample weights of the update from the noised sample (f-distill's h(r), set by
    # `method.adversarial`); None: every sample weighs 1.
    weigh: Callable[..., torch.Tensor] | None = None

    def __init__(self, p_mean: float, p_std: float) -> None:
        self.p_mean, self.p_std = p_mean, p_std

    @classmethod
    def from_config(cls, cfg) -> VSDLoss:
        return cls(cfg.p_mean, cfg.p_std)

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return sample_lognormal_sigma(n, self.p_mean, self.p_std, rng, device)

    def __call__(self, x, sigma, noise, fake, target, cond) -> GeneratorLossOutput:
        with torch.no_grad():
            x_t = x + sigma_like(sigma, x) * noise
            gap = fake(x_t, sigma, **cond) - target(x_t, sigma, **cond)
        per_sample = (gap * x).flatten(1).sum(dim=1)
        if self.weigh is not None:
            per_sample = per_sample * self.weigh(x_t, sigma, cond)
        return GeneratorLossOutput(per_sample.mean(), gap.abs().mean())


class DMDLoss:
    """Distribution matching distillation (DMD / DMD2): the VSD direction normalised per sample by
    mean |x - D_target(x_t)|; sigma at a uniform index of 1000 Karras levels from int(2 %) to
    int(98 %), both included (DMD2's 20..980).
    The loss is DMD2's `0.5 * mse_loss(x, sg(x - grad), reduction="mean")`: a mean over every
    element, so DMD2's gradient clipping (10 on ImageNet) means the same here."""

    fake_side = "score"
    weigh: Callable[..., torch.Tensor] | None = None  # as VSDLoss.weigh

    def __init__(self, low: float = 0.02, high: float = 0.98) -> None:
        self.low, self.high = low, high

    @classmethod
    def from_config(cls, cfg) -> DMDLoss:
        return cls()

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        low, high = round(self.low * KARRAS_LEVELS), round(self.high * KARRAS_LEVELS)
        return sample_karras_index_sigma(n, rng, device, low, high + 1)

    def __call__(self, x, sigma, noise, fake, target, cond) -> GeneratorLossOutput:
        with torch.no_grad():
            x_t = x + sigma_like(sigma, x) * noise
            d_target = target(x_t, sigma, **cond)
            gap = fake(x_t, sigma, **cond) - d_target
            scale = (x - d_target).abs().flatten(1).mean(dim=1).clamp(min=1e-5)
            direction = gap / sigma_like(scale, x)
            if self.weigh is not None:
                direction = direction * sigma_like(self.weigh(x_t, sigma, cond), x)
        loss = 0.5 * ((x - (x - direction).detach()) ** 2).mean()
        return GeneratorLossOutput(loss, gap.abs().mean())


class SiDLoss:
    """Score identity distillation (Zhou et al. 2024): per sample
    (D_t - D_f) . ((D_t - x) - alpha (D_t - D_f)) / mean |x - D_t|, differentiated through x_t and
    both denoisers' inputs; t ~ U(0, 0.8) on EDM's rho grid (sigma up to about 24)."""

    fake_side = "score"

    def __init__(self, alpha: float = 1.2, t_max: float = 0.8) -> None:
        self.alpha, self.t_max = alpha, t_max

    @classmethod
    def from_config(cls, cfg) -> SiDLoss:
        return cls(alpha=cfg.sid_alpha)

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return karras_sigma(torch.rand(n, generator=rng, device=device) * self.t_max)

    def __call__(self, x, sigma, noise, fake, target, cond) -> GeneratorLossOutput:
        x_t = x + sigma_like(sigma, x) * noise
        trainable = [p for p in fake.parameters() if p.requires_grad]
        for p in trainable:  # gradients flow through the fake score's input, not its weights
            p.requires_grad_(False)
        try:  # each reads its own copy of x_t: their input gradients then meet in a single
            # sum, which is exactly zero when fake = target (interleaved, it leaves rounding)
            d_fake = fake(x_t.clone(), sigma, **cond)
            d_target = target(x_t.clone(), sigma, **cond)
        finally:
            for p in trainable:
                p.requires_grad_(True)
        diff = d_target - d_fake
        scale = (x - d_target).detach().abs().flatten(1).mean(dim=1).clamp(min=1e-5)
        per_sample = (diff * ((d_target - x) - self.alpha * diff)).flatten(1).sum(dim=1)
        return GeneratorLossOutput(
            (per_sample / scale).mean(), diff.detach().abs().mean(), sample_scale=scale
        )


class DiffRatioLoss(VSDLoss):
    """DiffRatio (Chen et al.): VSD's update with D_fake - D_target estimated as -sigma^2 times
    the input gradient of a density-ratio network trained on real data (`method.ratio`); `fake`
    is that network and there is no target. The paper's own weighting over noise levels was not
    available to us. `weighting="denoiser"` is VSD's (weight 1 in denoiser space, log-normal
    sigma), so that it differs from `vsd` only in how the score difference is estimated; but it
    multiplies the classifier's gradient, and its noise, by sigma^2: at high noise, where the
    classifier knows least, its error dominates the update. `weighting="score"` (the default a
    run resolves to) uses -sigma_data^2 times the gradient instead: the same at
    sigma = sigma_data, no growth above it (docs/benchmarks.md)."""

    fake_side = "ratio"

    def __init__(self, p_mean: float, p_std: float, weighting: str) -> None:
        super().__init__(p_mean, p_std)
        self.weight = RATIO_WEIGHTINGS[weighting]

    @classmethod
    def from_config(cls, cfg) -> DiffRatioLoss:
        return cls(cfg.p_mean, cfg.p_std, cfg.ratio_weighting)

    def __call__(self, x, sigma, noise, fake, target, cond) -> GeneratorLossOutput:
        x_t = x.detach() + sigma_like(sigma, x) * noise
        gap = score_difference(fake, x_t, sigma, cond).detach()  # sigma^2 times the gradient
        gap = gap * sigma_like(self.weight(sigma, fake.spec.sigma_data), x)
        loss = (gap * x).flatten(1).sum(dim=1).mean()
        return GeneratorLossOutput(loss, gap.abs().mean())


# DiffRatio's weight over noise levels, relative to sigma^2 times the ratio's gradient.
RATIO_WEIGHTINGS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "denoiser": lambda sigma, sigma_data: torch.ones_like(sigma),  # VSD's
    "score": lambda sigma, sigma_data: sigma_data**2 / sigma**2,
}


GENERATOR_LOSSES: dict[str, type] = {
    "vsd": VSDLoss,
    "dmd": DMDLoss,
    "sid": SiDLoss,
    "diffratio": DiffRatioLoss,
}
# The noise levels each loss's reference trains its fake score at (Diff-Instruct, DMD2, SiD);
# DiffRatio trains its ratio network where the generator is updated.
LOSS_TRAINING_SIGMA: dict[str, SigmaKind] = {
    "vsd": "lognormal",
    "dmd": "karras",
    "sid": "lognormal",
    "diffratio": "lognormal",
}


class AtLevels:
    """A generator loss queried at other noise levels than its reference's: a discrete-time
    teacher knows only its own timesteps, where every loss queries it at DMD2's 2 %..98 %."""

    def __init__(self, loss: GeneratorLoss, levels) -> None:
        self.loss, self.levels = loss, levels
        self.fake_side = loss.fake_side

    @property
    def weigh(self):
        """The wrapped loss's per-sample weighting (VSD's and DMD's `weigh`)."""
        return self.loss.weigh

    @weigh.setter
    def weigh(self, value) -> None:
        self.loss.weigh = value

    def sample_sigma(self, n: int, rng: torch.Generator, device: torch.device) -> torch.Tensor:
        return self.levels.sample(n, rng, device)

    def __call__(self, x, sigma, noise, fake, target, cond) -> GeneratorLossOutput:
        return self.loss(x, sigma, noise, fake, target, cond)


def make_generator_loss(cfg, levels=None) -> GeneratorLoss:
    """The loss named by `cfg.loss`, built from the fields of the config it needs; queried at
    `levels` instead of its own noise levels when the teacher's family says so."""
    if cfg.loss not in GENERATOR_LOSSES:
        raise DisbackError(f"unknown loss {cfg.loss!r} (known: {', '.join(GENERATOR_LOSSES)})")
    loss = GENERATOR_LOSSES[cfg.loss].from_config(cfg)
    return loss if levels is None else AtLevels(loss, levels)


def generator_step(
    generator: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: GeneratorLoss,
    fake: Denoiser,
    target: Denoiser,
    shape: tuple[int, ...],
    conditions: ConditionSource,
    rng: torch.Generator,
    clip: float = math.inf,
    ex: Execution | None = None,
) -> tuple[GeneratorLossOutput, torch.Tensor]:
    """One step of the generator on `loss_fn` at noised samples x_t = G(z) + sigma n.

    The fake score runs without dropout here, as the targets do (SiD's choice): at fake = target
    their difference is then exactly zero, not dropout noise. `shape` is this rank's batch; the
    random numbers are drawn for the global batch (see `parallel`). Returns the loss output and
    the gradient norm (before clipping)."""
    ex = ex or Execution(rng.device)
    device = rng.device
    n, z, cond = generator_inputs(shape, conditions, rng, ex)
    with ex.autocast():
        x = generator(ex.to_input(z), **cond)
        sigma = ex.local(loss_fn.sample_sigma(n, rng, device))
        noise = ex.local(torch.randn((n, *shape[1:]), generator=rng, device=device))
        with eval_mode(fake):
            out = loss_fn(x, sigma, ex.to_input(noise), fake, target, cond)
    return out, apply_gradients(out.loss, generator, optimizer, ex, clip)
