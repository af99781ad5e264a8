"""Backtracking's first iteration recomputed outside the training loop, for vector teachers.

The networks come from their files (G0 as `build_g0` makes it, the fake score from the last path
node, the target from the node before it), the random numbers are drawn in the loop's order from
a generator seeded with the run's seed, and each generator loss is written out from its paper:

- VSD (Diff-Instruct): sum over elements of sg(D_fake - D_target) * x, averaged over samples,
  sigma from EDM's log-normal;
- DMD (DMD2): 0.5 * mse(x, sg(x - g)) with g = (D_fake - D_target) / mean |x - D_target| per
  sample, sigma at a uniform index 20 <= i <= 980 of 1000 Karras levels (DMD2);
- SiD: per sample (D_t - D_f) . ((D_t - x) - alpha (D_t - D_f)) / sg(mean |x - D_t|), through
  both denoisers' inputs but not their weights, sigma at t ~ U(0, 0.8) on the Karras grid.

The loop logs the loss, the score gap and the generator's gradient norm of each iteration; with
log_every = 1 its first metrics line must hold these values.
"""

from __future__ import annotations

import torch

from disback_cli.method.generator import build_g0
from disback_cli.models.denoiser_files import load_denoiser
from disback_cli.models.networks import NetworkSpec
from disback_cli.models.teachers import open_teacher
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest


def karras(t: torch.Tensor) -> torch.Tensor:
    """EDM's rho = 7 grid from sigma 0.002 (t = 0) to 80 (t = 1)."""
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    return (lo + t * (hi - lo)) ** 7


def frozen(path) -> torch.nn.Module:
    return load_denoiser(path).denoiser.eval().requires_grad_(False)


def first_iteration(trajectory, run_dir) -> dict[str, float]:
    """loss_g, score_gap and grad_norm_g of the first iteration of the run in `run_dir`."""
    traj = read_manifest(trajectory, TrajectoryManifest)
    cfg = read_manifest(run_dir, BacktrackManifest).config  # resolved: p_mean, sid_alpha, ...
    network = NetworkSpec.model_validate(traj.teacher.network)
    assert network.label_dim == 0 and len(network.data_shape) == 1, "unconditional vectors only"
    teacher = open_teacher(traj.teacher.source)
    generator, _ = build_g0(traj.g0, teacher, torch.device("cpu"))
    generator.requires_grad_(True)
    fake = frozen(trajectory / traj.nodes[-1].file)
    previous = traj.nodes[-2]  # node N - 1: the teacher itself (no file) when N = 1
    if previous.file is None:
        target = teacher.denoiser.eval().requires_grad_(False)
    else:
        target = frozen(trajectory / previous.file)

    rng = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch, *network.data_shape)
    n = cfg.batch
    z = torch.randn(shape, generator=rng)
    x = generator(z)
    if cfg.loss == "vsd":
        sigma = (torch.randn(n, generator=rng) * cfg.p_std + cfg.p_mean).exp()
    elif cfg.loss == "dmd":
        sigma = karras(torch.randint(20, 981, (n,), generator=rng).float() / 999)
    else:
        sigma = karras(torch.rand(n, generator=rng) * 0.8)
    noise = torch.randn(shape, generator=rng)
    x_t = x + sigma[:, None] * noise

    if cfg.loss == "vsd":
        gap = (fake(x_t, sigma) - target(x_t, sigma)).detach()
        loss = (gap * x).sum(dim=1).mean()
    elif cfg.loss == "dmd":
        d_target, d_fake = target(x_t, sigma).detach(), fake(x_t, sigma).detach()
        gap = d_fake - d_target
        g = gap / (x.detach() - d_target).abs().mean(dim=1, keepdim=True)
        loss = 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach())
    else:
        d_target, d_fake = target(x_t, sigma), fake(x_t, sigma)
        gap = d_target - d_fake
        scale = (x - d_target).abs().mean(dim=1).detach()
        per_sample = (gap * ((d_target - x) - cfg.sid_alpha * gap)).sum(dim=1)
        loss = (per_sample / scale).mean()
    grads = torch.autograd.grad(loss, [p for p in generator.parameters() if p.requires_grad])
    grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    return {
        "loss_g": loss.item(),
        "score_gap": gap.abs().mean().item(),
        "grad_norm_g": grad_norm.item(),
    }
