"""Seeds, per-seed noise and conditions, one-step generation, and EDM's Heun sampler for
multi-step teachers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from disback_cli.errors import ConfigError
from disback_cli.models.conditioning import (
    NO_CONDITIONS,
    Conditioning,
    ConditionSource,
    Unconditional,
)
from disback_cli.models.precond import Denoiser
from disback_cli.store.samples import MAX_SAMPLES

MAX_SEED = 1 << 62  # seeds of repeats are offset, and torch takes seeds below 2**64


def parse_seeds(text: str) -> list[int]:
    """'0-999' or '1,5,10-12' -> list of seeds (ranges inclusive), in the order given; at most
    MAX_SAMPLES of them, each below MAX_SEED (counted before any list is built)."""
    parts: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ConfigError(f"seed range {part!r} is inverted")
            else:
                lo = hi = int(part)
        except ValueError:
            raise ConfigError(
                f"bad seed list {text!r:.60}: expected e.g. '0-999' or '1,5,10-12'"
            ) from None
        if lo < 0 or hi >= MAX_SEED:
            raise ConfigError(f"bad seed list {text!r:.60}: seeds must lie in 0..{MAX_SEED - 1}")
        parts.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in parts)
    if count > MAX_SAMPLES:
        raise ConfigError(f"--seeds names {count} seeds, more than {MAX_SAMPLES} in one call")
    seeds = [seed for lo, hi in parts for seed in range(lo, hi + 1)]
    if len(set(seeds)) != len(seeds):  # the same seed twice is the same sample twice
        raise ConfigError(f"bad seed list {text!r:.60}: a seed appears more than once")
    return seeds


def seeded_noise(
    seeds: Sequence[int], shape: tuple[int, ...], conditions: ConditionSource = Unconditional()
) -> tuple[torch.Tensor, Conditioning]:
    """Noise z and conditions, with one CPU random stream per seed.

    Sample i depends only on seeds[i], so results do not depend on batch size or device.
    """
    z, cond = [], []
    for seed in seeds:
        rng = torch.Generator().manual_seed(seed)
        z.append(torch.randn(shape, generator=rng))
        cond.append(conditions.of_seed(rng))
    return torch.stack(z), Conditioning.cat(cond)


def one_step_batches(
    generator: torch.nn.Module,
    seeds: Sequence[int],
    data_shape: tuple[int, ...],
    conditions: ConditionSource,
    batch: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, Conditioning]]:
    """Yield (samples, conditions) on the CPU for consecutive chunks of `seeds`."""
    for start in range(0, len(seeds), batch):
        z, cond = seeded_noise(seeds[start : start + batch], data_shape, conditions)
        with torch.no_grad():
            x = generator(z.to(device), **cond.to(device))
        yield x.cpu(), cond


VERIFIER_SIGMAS = (0.05, 0.1, 0.2)  # x sigma_data: where the ratio network scores a candidate


def resample(score: torch.Tensor, rng: torch.Generator) -> int:
    """Importance resampling: the verifier's logit estimates log p_data / p_gen, so drawing a
    candidate with probability proportional to exp(logit) turns K generator samples into an
    approximate data sample (exact as K grows, if the ratio is). A verifier that knows little
    (logits near equal) leaves plain sampling almost unchanged."""
    weights = torch.softmax(score.detach().to("cpu", torch.float64), dim=0)
    return int(torch.multinomial(weights, 1, generator=rng))


def argmax(score: torch.Tensor, rng: torch.Generator) -> int:
    """The most data-like candidate: raises precision but concentrates samples where the
    verifier is most confident, including where it is confidently wrong."""
    return int(score.argmax())


SELECTION_RULES = {"resample": resample, "argmax": argmax}


def best_of_k(
    generator: torch.nn.Module,
    ratio: torch.nn.Module,
    seeds: Sequence[int],
    data_shape: tuple[int, ...],
    conditions: ConditionSource,
    k: int,
    device: torch.device,
    rule: str = "resample",
) -> tuple[torch.Tensor, Conditioning, torch.Tensor]:
    """For each seed, K one-step candidates and one chosen by `rule` (`SELECTION_RULES`) from
    the density-ratio network's (DiffRatio's verifier's) score: the mean log-ratio at a few
    small noise levels.

    Candidate 0 is the seed's ordinary sample (its noise, then its conditions, as
    `seeded_noise` draws them), so K = 1 is plain sampling; candidates 1..K-1, the scoring
    noise and the rule's draw continue the seed's own stream, so the choice depends on the seed
    alone. Returns the chosen samples and conditions (on the CPU) and their scores."""
    choose = SELECTION_RULES[rule]
    chosen, conds, scores = [], [], []
    sigma_data = float(getattr(generator.denoiser, "sigma_data", 0.5))
    for seed in seeds:
        rng = torch.Generator().manual_seed(seed)
        z = [torch.randn(data_shape, generator=rng)]
        cond = conditions.of_seed(rng)
        z += [torch.randn(data_shape, generator=rng) for _ in range(k - 1)]
        noise = torch.randn(len(VERIFIER_SIGMAS), k, *data_shape, generator=rng)
        z = torch.stack(z).to(device)
        many = cond.map(lambda t: t.expand(k, *t.shape[1:])).to(device)
        with torch.no_grad():
            x = generator(z, **many)
            score = torch.stack(
                [
                    ratio(x + s * sigma_data * noise[i].to(device), s * sigma_data, **many)
                    for i, s in enumerate(VERIFIER_SIGMAS)
                ]
            ).mean(dim=0)
        pick = choose(score, rng)
        chosen.append(x[pick].cpu())
        conds.append(cond)
        scores.append(score[pick].cpu())
    return torch.stack(chosen), Conditioning.cat(conds), torch.stack(scores)


def edm_sampler(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: Conditioning = NO_CONDITIONS,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Deterministic Heun sampler of Karras et al. 2022 (Algorithm 1), in float64."""
    step = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (
        sigma_max ** (1 / rho)
        + step / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(itertools.pairwise(t_steps)):
        x_cur = x_next
        d_cur = (x_cur - denoiser(x_cur, t_cur, **cond).to(torch.float64)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoiser(x_next, t_next, **cond).to(torch.float64)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


class HeunSampler(nn.Module):
    """A teacher as a sampler z -> x by EDM's Heun method, for reference samples."""

    def __init__(self, denoiser: nn.Module, steps: int = 18) -> None:
        super().__init__()
        self.denoiser, self.steps = denoiser, steps

    def forward(self, z: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        sigma_min = max(0.002, getattr(self.denoiser, "sigma_min", 0.0))
        sigma_max = min(80.0, getattr(self.denoiser, "sigma_max", math.inf))
        x = edm_sampler(self.denoiser, z, Conditioning(cond), self.steps, sigma_min, sigma_max)
        return x.to(torch.float32)
