"""Denoising score matching with EDM's loss: how the auxiliary model and the fake score learn."""

from __future__ import annotations

import math

import torch

from disback_cli.method.noise import TrainingSigma
from disback_cli.models.conditioning import NO_CONDITIONS, Conditioning, ConditionSource
from disback_cli.models.networks import eval_mode
from disback_cli.models.precond import Denoiser, sigma_like
from disback_cli.runtime.parallel import Execution


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (DMD2's 1/sigma^2 + 1/sd^2)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_weight(denoiser: Denoiser, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) of the denoiser's own training loss: EDM's, unless its parameterisation
    says otherwise (a DDPM's epsilon or v MSE: `DiscreteDDPMPrecond.loss_weight`)."""
    weight = getattr(denoiser, "loss_weight", None)
    return weight(sigma) if weight is not None else edm_loss_weight(sigma, denoiser.sigma_data)


def edm_denoising_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    cond: Conditioning = NO_CONDITIONS,
) -> torch.Tensor:
    """EDM loss: lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2 (lambda: `denoising_weight`)."""
    sigma = sigma_like(sigma, x0)
    weight = denoising_weight(denoiser, sigma)
    denoised = denoiser(x0 + sigma * noise, sigma, **cond)
    return (weight * (denoised - x0) ** 2).mean()


def clip_gradients(parameters, clip: float = math.inf) -> torch.Tensor:
    """Total gradient norm (logged, and watched by the divergence guard), clipping to `clip`;
    without a finite `clip` the gradients are left untouched rather than multiplied by 1."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if math.isfinite(clip):
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def generator_inputs(
    shape: tuple[int, ...], conditions: ConditionSource, rng: torch.Generator, ex: Execution
) -> tuple[int, torch.Tensor, Conditioning]:
    """The global batch size, this rank's latents z and conditions for one step: drawn for the
    global batch from `rng` (latents first), so every rank count sees the same numbers."""
    n = ex.global_batch(shape[0])
    z = ex.local(torch.randn((n, *shape[1:]), generator=rng, device=rng.device))
    return n, z, conditions.draw(n, rng, rng.device).map(ex.local)


def apply_gradients(
    loss: torch.Tensor,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ex: Execution,
    clip: float,
) -> torch.Tensor:
    """Backward, average across ranks, clip and step; returns the norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ex.average_gradients(module.parameters())
    grad_norm = clip_gradients(module.parameters(), clip)
    optimizer.step()
    return ex.layout.local_norm(grad_norm)


def generator_denoising_loss(
    denoiser: torch.nn.Module,
    generator: torch.nn.Module,
    shape: tuple[int, ...],
    conditions: ConditionSource,
    levels: TrainingSigma,
    rng: torch.Generator,
    ex: Execution,
) -> tuple:
    """The EDM loss of `denoiser` on fresh samples x0 of `generator` (not trained here), and
    what it was computed at: (x0, sigma, noise, the conditions the denoiser saw, loss).

    The samples come from the generator in eval mode, as `disback sample` draws them (SiD and
    Diff-Instruct do the same), so dropout in a generator being trained does not leak into
    what the fake score learns. `shape` is this rank's batch; the random numbers are drawn for
    the global batch (see `parallel`)."""
    device = rng.device
    n, z, cond = generator_inputs(shape, conditions, rng, ex)
    sigma = ex.local(levels.sample(n, rng, device))
    noise = ex.local(torch.randn((n, *shape[1:]), generator=rng, device=device))
    seen, dropout = cond, getattr(conditions, "dropout", 0.0)  # sources that drop prompts
    if dropout:  # the denoiser sees that share unconditional, as its teacher was trained
        dropped = ex.local(torch.rand(n, generator=rng, device=device) < dropout)
        seen = conditions.unconditional_rows(cond, dropped)
    with torch.no_grad(), eval_mode(generator):
        x0 = generator(ex.to_input(z), **cond)
    noise = ex.to_input(noise)
    return x0, sigma, noise, seen, edm_denoising_loss(denoiser, x0, sigma, noise, seen)


def denoising_step(
    denoiser: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.nn.Module,
    shape: tuple[int, ...],
    conditions: ConditionSource,
    levels: TrainingSigma,
    rng: torch.Generator,
    clip: float = math.inf,
    ex: Execution | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EDM denoising step of `denoiser` on fresh samples of `generator`: fits the auxiliary
    model to G0 while recording and the fake score to G while backtracking. Returns the loss
    and the gradient norm (before clipping)."""
    ex = ex or Execution(rng.device)
    with ex.autocast():
        *_, loss = generator_denoising_loss(denoiser, generator, shape, conditions, levels, rng, ex)
    return loss.detach(), apply_gradients(loss, denoiser, optimizer, ex, clip)
