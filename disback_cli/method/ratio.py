"""DiffRatio (Chen et al., arXiv 2502.08005): one density-ratio network instead of the target and
fake scores, trained as a classifier, and the generator update it gives.

The classifier d(x_t, sigma) tells noised data (label 1) from noised generator samples (label 0)
with the logistic loss, at the noise levels where the generator is updated; at its optimum
d = log p_data,sigma - log q_G,sigma. Its input gradient is then the difference of the two
scores that VSD, DMD and SiD estimate with two networks: grad log q - grad log p = -grad d, so
D_fake - D_target = sigma^2 (grad log q - grad log p) = -sigma^2 grad d, which disback feeds to
the VSD update (Diff-Instruct's weight) so that the two objectives differ only in how that
difference is estimated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from disback_cli.method.dsm import apply_gradients, generator_inputs
from disback_cli.method.noise import TrainingSigma
from disback_cli.models.conditioning import ConditionSource
from disback_cli.models.networks import eval_mode
from disback_cli.models.precond import sigma_like
from disback_cli.runtime.parallel import Execution


def score_difference(ratio, x_t: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
    """sigma^2 (grad log q - grad log p) at x_t, i.e. D_fake - D_target, from the ratio network's
    input gradient (its weights get no gradient)."""
    x_t = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = ratio(x_t, sigma, **cond)
        (grad,) = torch.autograd.grad(logits.sum(), x_t)
    return -(sigma_like(sigma, x_t) ** 2) * grad


def ratio_step(
    ratio: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.nn.Module,
    shape: tuple[int, ...],
    conditions: ConditionSource,
    levels: TrainingSigma,
    rng: torch.Generator,
    clip: float = math.inf,
    ex: Execution | None = None,
    *,
    data,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic-regression step of the ratio network: as many noised data samples (label 1)
    as noised generator samples (label 0), each at its own noise level; `data` is the
    `method.data.DataSource`. The generator samples come in eval mode, as the fake score's do.
    Called like `dsm.denoising_step`; returns the loss and the gradient norm."""
    ex = ex or Execution(rng.device)
    device = rng.device
    n, z, cond = generator_inputs(shape, conditions, rng, ex)
    real, real_cond = data.draw(n, rng, device)
    real, real_cond = ex.local(real), real_cond.map(ex.local)
    sigmas, noises = [], []
    for _ in range(2):  # data, generator
        sigmas.append(ex.local(levels.sample(n, rng, device)))
        noises.append(ex.local(torch.randn((n, *shape[1:]), generator=rng, device=device)))
    with ex.autocast():
        with torch.no_grad(), eval_mode(generator):
            fake = generator(ex.to_input(z), **cond)
        real_t = real + sigma_like(sigmas[0], real) * noises[0]
        fake_t = fake + sigma_like(sigmas[1], fake) * noises[1]
        real_logit = ratio(real_t, sigmas[0], **real_cond)
        fake_logit = ratio(fake_t, sigmas[1], **cond)
        loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
    return loss.detach(), apply_gradients(loss, ratio, optimizer, ex, clip)
