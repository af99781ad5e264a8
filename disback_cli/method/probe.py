"""Where a denoiser stands on the degradation path: measured on one fixed probe of noised G0
samples, so that the numbers compare across nodes, runs and seeds."""

from __future__ import annotations

import torch
from torch import nn

from disback_cli.method.dsm import denoising_weight
from disback_cli.method.noise import TrainingSigma
from disback_cli.models.networks import eval_mode
from disback_cli.models.teachers import Teacher

PROBE_SAMPLES = 512
PROBE_SEED = 20240828  # fixed, so node distances compare across runs and seeds


class PathProbe:
    """A fixed set of noised G0 samples on which the teacher and every node are measured: the
    mean |D - D_teacher| (how far along the path a node is) and the EDM denoising loss against
    the clean G0 samples (how well it fits G0). Networks see it in chunks of the training batch,
    so it needs no more memory than a training step."""

    def __init__(self, teacher: Teacher, g0: nn.Module, levels: TrainingSigma, chunk: int, device):
        rng = torch.Generator(device).manual_seed(PROBE_SEED)
        shape = (PROBE_SAMPLES, *teacher.spec.data_shape)
        self.chunk = chunk
        self.cond = teacher.conditions.draw(PROBE_SAMPLES, rng, device)
        z = torch.randn(shape, generator=rng, device=device)
        self.sigma = levels.sample(PROBE_SAMPLES, rng, device)
        noise = torch.randn(shape, generator=rng, device=device)
        with torch.no_grad():
            self.x0 = torch.cat([g0(z[i], **self.cond.rows(i)) for i in self._chunks()])
        shape = (-1, *[1] * (self.x0.ndim - 1))
        self.x_t = self.x0 + self.sigma.reshape(shape) * noise
        self.weight = denoising_weight(teacher.denoiser, self.sigma).reshape(shape)
        self.reference = self._denoise(teacher.denoiser)
        self.teacher_loss = self._loss(self.reference)

    def _chunks(self) -> list[slice]:
        return [slice(i, i + self.chunk) for i in range(0, PROBE_SAMPLES, self.chunk)]

    @torch.no_grad()
    def _denoise(self, denoiser: nn.Module) -> torch.Tensor:
        with eval_mode(denoiser):
            return torch.cat(
                [denoiser(self.x_t[i], self.sigma[i], **self.cond.rows(i)) for i in self._chunks()]
            )

    def _loss(self, denoised: torch.Tensor) -> float:
        return (self.weight * (denoised - self.x0) ** 2).mean().item()

    def __call__(self, denoiser: nn.Module) -> tuple[float, float]:
        """(mean |D - D_teacher|, denoising loss on G0) of `denoiser`."""
        out = self._denoise(denoiser)
        return (out - self.reference).abs().mean().item(), self._loss(out)
