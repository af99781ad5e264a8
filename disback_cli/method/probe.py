"""Where a denoiser stands on the degradation path: measured on one fixed probe of noised G0
samples, so that the numbers compare across nodes, runs and seeds."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from disback_cli.method.dsm import denoising_weight
from disback_cli.method.noise import TrainingSigma
from disback_cli.models.networks import eval_mode
from disback_cli.models.teachers import Teacher
from disback_cli.runtime.reporting import Reporter, SilentReporter

PROBE_SEED = 20240828  # fixed, so node distances compare across runs and seeds
# A probe forward keeps no activations for a backward pass, where a training step keeps every
# layer's (tens of them in a U-Net): four training batches at a time stay within the memory of a
# step, and on a GPU larger calls run faster. On a CPU the cost per sample is flat up to about 8
# and grows beyond (benchmarks/probe_chunk.py: a CIFAR-10 DDPM++ forward takes 290 ms a sample
# at 2 and 8, 346 ms at 32), so there the chunk stays small.
CHUNK_BATCHES = 4
CPU_CHUNK = 8


def probe_chunk(samples: int, batch: int, device: torch.device) -> int:
    """Samples per network call while the probe is built and measured."""
    per_call = CHUNK_BATCHES * batch if device.type == "cuda" else min(batch, CPU_CHUNK)
    return min(samples, per_call)


class PathProbe:
    """A fixed set of `samples` noised G0 samples on which the teacher and every node are
    measured: the mean |D - D_teacher| (how far along the path a node is) and the EDM denoising
    loss against the clean G0 samples (how well it fits G0).

    Networks see it `chunk` samples at a time (every sample's noise is drawn before any chunk
    is cut, so the chunk does not change the samples). Building it (G0 and the teacher over
    every sample) is reported as progress: with a large teacher on a CPU it is the longest phase
    of a short recording."""

    def __init__(
        self,
        teacher: Teacher,
        g0: nn.Module,
        levels: TrainingSigma,
        size: tuple[int, int],
        device: torch.device,
        reporter: Reporter | None = None,
    ) -> None:
        (samples, self.chunk), reporter = size, reporter or SilentReporter()
        rng = torch.Generator(device).manual_seed(PROBE_SEED)
        shape = (samples, *teacher.spec.data_shape)
        self.cond = teacher.conditions.draw(samples, rng, device)
        z = torch.randn(shape, generator=rng, device=device)
        self.sigma = levels.sample(samples, rng, device)
        noise = torch.randn(shape, generator=rng, device=device)
        calls = len(self._chunks())
        reporter.start("path probe", 2 * calls, 0)
        with torch.no_grad():
            self.x0 = self._chunked(lambda rows: g0(z[rows], **self.cond.rows(rows)), reporter)
        shape = (-1, *[1] * (self.x0.ndim - 1))
        self.x_t = self.x0 + self.sigma.reshape(shape) * noise
        self.weight = denoising_weight(teacher.denoiser, self.sigma).reshape(shape)
        self.reference = self._denoise(teacher.denoiser, reporter, calls)
        self.teacher_loss = self._loss(self.reference)

    def _chunks(self) -> list[slice]:
        return [slice(i, i + self.chunk) for i in range(0, len(self.sigma), self.chunk)]

    def _chunked(
        self, call: Callable[[slice], torch.Tensor], reporter: Reporter | None, done: int = 0
    ) -> torch.Tensor:
        outputs = []
        for index, rows in enumerate(self._chunks(), start=done + 1):
            outputs.append(call(rows))
            if reporter is not None:
                reporter.advance(index)
        return torch.cat(outputs)

    @torch.no_grad()
    def _denoise(self, denoiser: nn.Module, reporter=None, done: int = 0) -> torch.Tensor:
        def call(rows: slice) -> torch.Tensor:
            return denoiser(self.x_t[rows], self.sigma[rows], **self.cond.rows(rows))

        with eval_mode(denoiser):
            return self._chunked(call, reporter, done)

    def _loss(self, denoised: torch.Tensor) -> float:
        return (self.weight * (denoised - self.x0) ** 2).mean().item()

    def __call__(self, denoiser: nn.Module) -> tuple[float, float]:
        """(mean |D - D_teacher|, denoising loss on G0) of `denoiser`."""
        out = self._denoise(denoiser)
        return (out - self.reference).abs().mean().item(), self._loss(out)
