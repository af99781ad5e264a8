"""The score mismatch DisBack is built on, measured where it can be measured exactly.

The paper's premise: early in distillation the generator's samples lie where the teacher's score
is a poor guide, and intermediate targets give better guidance. On a Gaussian-mixture data set
(`builtin:ring2d`) the data's denoiser D_data is known in closed form at every noise level, and
the generator's own noised distribution has an exact denoiser D_G for its empirical distribution
(the posterior mean over many of its samples), so every quantity of that argument is computable
at noised generator samples x_t = G(z) + sigma n:

    target_mse   |D_target - D_data|^2   how wrong the target is about the data there (for the
                                         baseline, whose target is the teacher: the score
                                         mismatch itself)
    fake_mse     |D_fake - D_G|^2        how well the fake score tracks the generator
    true_gap     |D_G - D_data|          how far the generator is from the data
    cosine       cos(D_fake - D_target, D_G - D_data)
                                         whether the generator's update points where the exact
                                         one (the gradient of the KL to the data) points: 1 is
                                         perfect guidance, 0 none

each a mean over a fixed set of noise levels and generator samples. Denoiser differences are
score differences scaled by sigma^2, so the cosine is the cosine of the scores' difference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from disback_cli.evaluation.datasets import GaussianMixture
from disback_cli.models.networks import eval_mode

SIGMAS = tuple(math.exp(v) for v in torch.linspace(math.log(0.05), math.log(5.0), 8).tolist())
QUERIES = 512  # noised generator samples per noise level
EMPIRICAL = 8192  # generator samples that define D_G
SEED = 31337  # fixed z, noise and empirical samples: evaluations compare along training


def empirical_denoiser(samples: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x0 + sigma n = x] for x0 drawn uniformly from `samples`: the exact denoiser of
    their empirical distribution (a softmax over squared distances), in float64."""
    samples, x = samples.double(), x.double()
    logits = -(torch.cdist(x, samples) ** 2) / (2 * sigma**2)
    return logits.softmax(dim=1) @ samples


class ScoreMismatch:
    """Measures the quantities above for a generator, its fake score and its current target."""

    def __init__(self, data: GaussianMixture, device) -> None:
        self.data, self.device = data, torch.device(device)
        rng = torch.Generator().manual_seed(SEED)
        shape = data.data_shape
        self.z_empirical = torch.randn(EMPIRICAL, *shape, generator=rng)
        self.z = torch.randn(len(SIGMAS), QUERIES, *shape, generator=rng)
        self.noise = torch.randn(len(SIGMAS), QUERIES, *shape, generator=rng)

    @torch.no_grad()
    def __call__(self, generator: nn.Module, fake: nn.Module, target: nn.Module) -> dict:
        dev = self.device
        with eval_mode(generator), eval_mode(fake), eval_mode(target):
            empirical = generator(self.z_empirical.to(dev)).double().cpu()
            totals = {"target_mse": 0.0, "fake_mse": 0.0, "true_gap": 0.0, "cosine": 0.0}
            for i, sigma in enumerate(SIGMAS):
                x0 = generator(self.z[i].to(dev)).double().cpu()
                x_t = x0 + sigma * self.noise[i].double()
                d_data = self.data.denoise(x_t, sigma)
                d_g = empirical_denoiser(empirical, x_t, sigma)
                query = x_t.float().to(dev)
                d_fake = fake(query, sigma).double().cpu()
                d_target = target(query, sigma).double().cpu()
                ideal, actual = d_g - d_data, d_fake - d_target
                totals["target_mse"] += (d_target - d_data).pow(2).sum(1).mean().item()
                totals["fake_mse"] += (d_fake - d_g).pow(2).sum(1).mean().item()
                totals["true_gap"] += ideal.norm(dim=1).mean().item()
                cos = torch.nn.functional.cosine_similarity(actual, ideal, dim=1, eps=1e-12)
                totals["cosine"] += cos.mean().item()
        return {k: v / len(SIGMAS) for k, v in totals.items()}
