"""Denoising score matching (`method.dsm`) pinned unit by unit (written against mutmut's survivors
of the module): every draw of a step from the run's own stream in a fixed order, the conditions
reaching both networks, the loss weight a parameterisation brings, and the gradient step's
averaging across ranks and clipping."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from disback_cli.method.dsm import (
    apply_gradients,
    denoising_step,
    denoising_weight,
    edm_loss_weight,
    generator_inputs,
)
from disback_cli.models.conditioning import Conditioning
from disback_cli.runtime.parallel import Execution

CPU = torch.device("cpu")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Context:
    def draw(self, n, rng, device):
        return Conditioning({"context": torch.rand(n, 1, generator=rng, device=device)})


class Levels:
    def sample(self, n, rng, device):
        return torch.rand(n, generator=rng, device=device) + 0.5


class Linear(nn.Module):
    """D(x, sigma, context) = w x + context: records the conditions it is given."""

    sigma_data = 0.5

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.seen = []

    def forward(self, x, sigma, **cond):
        self.seen.append(cond["context"].clone())
        return self.w * x + cond["context"]


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, z, **cond):
        self.seen.append(cond["context"].clone())
        return 2 * z


def test_a_denoising_step_draws_in_order_from_the_run_stream_and_passes_the_conditions():
    def step(seed: int):
        denoiser, generator = Linear(0.3), Generator()
        optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.0)
        torch.manual_seed(seed + 100)  # the global stream must not matter
        loss, norm = denoising_step(
            denoiser,
            optimizer,
            generator,
            (4, 3),
            Context(),
            Levels(),
            torch.Generator().manual_seed(seed),
        )
        return loss, norm, denoiser, generator

    loss, norm, denoiser, generator = step(3)
    replay = torch.Generator().manual_seed(3)
    z = torch.randn(4, 3, generator=replay)
    context = torch.rand(4, 1, generator=replay)
    sigma = torch.rand(4, generator=replay) + 0.5
    noise = torch.randn(4, 3, generator=replay)
    assert torch.equal(generator.seen[0], context) and torch.equal(denoiser.seen[0], context)
    x0, s = 2 * z, sigma.reshape(-1, 1)
    weight = edm_loss_weight(s, 0.5)
    expected = (weight * (0.3 * (x0 + s * noise) + context - x0) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    again, again_norm, _, _ = step(3)
    assert torch.equal(loss, again) and torch.equal(norm, again_norm)


class DroppingContext(Context):
    """A source whose trained denoiser sees `dropout` of the rows with the context -1."""

    def __init__(self, dropout: float) -> None:
        self.dropout = dropout

    @staticmethod
    def unconditional_rows(cond, rows):
        return Conditioning({"context": torch.where(rows[:, None], -1.0, cond["context"])})


def test_dropped_rows_reach_the_denoiser_unconditional_and_the_generator_as_drawn():
    """After the noise, one uniform per row from the run's stream: rows below `dropout` are
    shown to the denoiser unconditional; the generator draws every sample for its own
    condition. A source that drops nothing draws nothing more."""
    denoiser, generator = Linear(0.3), Generator()
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.0)
    rng = seeded(5)
    loss, _ = denoising_step(
        denoiser, optimizer, generator, (64, 3), DroppingContext(0.25), Levels(), rng
    )
    replay = seeded(5)
    z = torch.randn(64, 3, generator=replay)
    context = torch.rand(64, 1, generator=replay)
    sigma = (torch.rand(64, generator=replay) + 0.5).reshape(-1, 1)
    noise = torch.randn(64, 3, generator=replay)
    dropped = torch.rand(64, generator=replay) < 0.25
    assert 4 < int(dropped.sum()) < 60 and torch.equal(rng.get_state(), replay.get_state())
    seen = torch.where(dropped[:, None], -1.0, context)
    assert torch.equal(generator.seen[0], context) and torch.equal(denoiser.seen[0], seen)
    x0 = 2 * z
    expected = (edm_loss_weight(sigma, 0.5) * (0.3 * (x0 + sigma * noise) + seen - x0) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    plain, nothing_dropped = seeded(5), DroppingContext(0.0)
    denoising_step(Linear(0.3), optimizer, Generator(), (64, 3), nothing_dropped, Levels(), plain)
    replay = seeded(5)
    torch.randn(64, 3, generator=replay), torch.rand(64, 1, generator=replay)  # z, context
    torch.rand(64, generator=replay), torch.randn(64, 3, generator=replay)  # sigma, noise
    assert torch.equal(plain.get_state(), replay.get_state())


def test_the_global_batch_and_its_draws_follow_the_first_axis():
    n, z, cond = generator_inputs(
        (4, 3), Context(), torch.Generator().manual_seed(1), Execution(CPU)
    )
    replay = torch.Generator().manual_seed(1)
    assert n == 4 and torch.equal(z, torch.randn(4, 3, generator=replay))
    assert torch.equal(cond["context"], torch.rand(4, 1, generator=replay))


def test_the_loss_weight_is_the_parameterisations_own_or_edms():
    sigma = torch.tensor([0.1, 1.0, 10.0])

    class WithOwnWeight(nn.Module):
        sigma_data = 0.5

        def loss_weight(self, s):
            return 1 / s**2

    torch.testing.assert_close(denoising_weight(WithOwnWeight(), sigma), 1 / sigma**2)
    edm = denoising_weight(Linear(1.0), sigma)
    torch.testing.assert_close(edm, (sigma**2 + 0.25) / (sigma * 0.5) ** 2)


class Recording(Execution):
    """One process that records what the step asks it to average across ranks."""

    averaged: ClassVar[list] = []  # (Execution is a frozen dataclass: no instance fields)

    def average_gradients(self, parameters) -> None:
        self.averaged.append([p.grad.clone() for p in parameters])


@pytest.mark.parametrize("clip", [math.inf, 0.5])
def test_a_gradient_step_averages_across_ranks_then_clips(clip):
    module = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    ex = Recording(CPU)
    ex.averaged.clear()
    loss = (module(torch.tensor([[3.0, 4.0]])) ** 2).sum() / 2  # gradient (21, 28): norm 35
    norm = apply_gradients(loss, module, optimizer, ex, clip)
    assert float(norm) == pytest.approx(35.0)
    assert len(ex.averaged) == 1 and torch.equal(ex.averaged[0][0], torch.tensor([[21.0, 28.0]]))
    step = min(1.0, clip / 35.0)
    expected = torch.tensor([[1 - 21 * step, 1 - 28 * step]])
    torch.testing.assert_close(module.weight.detach(), expected)
