"""Train a built-in teacher from scratch on its exact ground-truth data (EDM loss, cosine lr)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from pydantic import ValidationError

from disback_cli import __version__
from disback_cli.config.teacher_train import TeacherTrainConfig
from disback_cli.errors import ConfigError, describe_validation_error
from disback_cli.evaluation.datasets import get_dataset
from disback_cli.method.dsm import edm_denoising_loss
from disback_cli.method.ema import ema_beta, update_ema
from disback_cli.method.noise import sample_lognormal_sigma
from disback_cli.models.conditioning import NO_CONDITIONS, ClassLabels
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.networks import NetworkSpec, build_denoiser
from disback_cli.runtime.devices import resolve_device
from disback_cli.runtime.reporting import Reporter, SilentReporter


def train_teacher(cfg: TeacherTrainConfig, out: Path, reporter: Reporter | None = None) -> str:
    """Train, write the teacher file (EMA weights if enabled) to `out` and return its sha256."""
    reporter = reporter or SilentReporter()
    device = resolve_device(cfg.device)
    dataset = get_dataset(cfg.dataset)
    label_dim = dataset.num_classes if cfg.conditional else 0
    try:
        spec = NetworkSpec(
            arch=cfg.arch,
            arch_kwargs=cfg.arch_kwargs,
            precond="edm",
            precond_kwargs={"sigma_data": cfg.sigma_data},
            data_shape=dataset.data_shape,
            label_dim=label_dim,
        )
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    torch.manual_seed(cfg.seed)  # network initialisation and dropout
    denoiser = build_denoiser(spec).to(device).train()
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
        return warm * 0.5 * (1 + math.cos(math.pi * step / cfg.iters))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    rng = torch.Generator(device).manual_seed(cfg.seed)
    reporter.start("teacher", cfg.iters, 0)
    for step in range(1, cfg.iters + 1):
        x0, classes = dataset.sample(cfg.batch, data_rng)
        x0 = x0.to(device)
        cond = ClassLabels(label_dim).one_hot(classes).to(device) if label_dim else NO_CONDITIONS
        sigma = sample_lognormal_sigma(cfg.batch, cfg.p_mean, cfg.p_std, rng, device)
        noise = torch.randn(x0.shape, generator=rng, device=device)
        loss = edm_denoising_loss(denoiser, x0, sigma, noise, cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if cfg.ema_halflife_kimg is not None:
            beta = ema_beta(cfg.batch, step * cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup)
            update_ema(ema, denoiser, beta)
        if step % 50 == 0 or step == cfg.iters:
            reporter.advance(step, loss=loss.item())
    info = {
        "role": "teacher",
        "dataset": cfg.dataset,
        "train_sigma": {"p_mean": cfg.p_mean, "p_std": cfg.p_std},
        "train_config": cfg.model_dump(mode="json", exclude={"device"}),
        "disback_version": __version__,
    }
    final = ema if cfg.ema_halflife_kimg is not None else denoiser
    return save_denoiser(out, final, spec, info)
