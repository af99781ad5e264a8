"""The generator losses' plumbing pinned unit by unit (written against mutmut's survivors of
`method/losses`): where each loss queries the denoisers and from which stream, the defaults of
its reference, the family's query levels wrapping a loss, and the generator step's draws."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.method.losses import (
    RATIO_WEIGHTINGS,
    AtLevels,
    DiffRatioLoss,
    DMDLoss,
    GeneratorLossOutput,
    SiDLoss,
    VSDLoss,
    generator_step,
    make_generator_loss,
)
from disback_cli.method.noise import karras_sigma
from disback_cli.models.conditioning import NO_CONDITIONS, Conditioning

CPU = torch.device("cpu")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("loss", [VSDLoss(-1.2, 1.2), DMDLoss(), SiDLoss()])
def test_each_loss_draws_its_levels_from_the_run_stream_only(loss):
    first = loss.sample_sigma(2048, seeded(5), CPU)
    torch.manual_seed(99)  # the global stream must not matter
    assert torch.equal(first, loss.sample_sigma(2048, seeded(5), CPU))
    assert not torch.equal(first, loss.sample_sigma(2048, seeded(6), CPU))


def test_dmd_queries_dmd2s_index_range_and_sid_its_t_max():
    levels = karras_sigma(torch.arange(1000) / 999)
    dmd = DMDLoss().sample_sigma(20000, seeded(1), CPU)
    index = (dmd[:, None] - levels[None, :]).abs().argmin(dim=1)
    assert torch.equal(dmd, levels[index])  # on the grid
    assert set(index.tolist()) == set(range(20, 981))  # DMD2: randint(20, 980 + 1)
    sid = SiDLoss().sample_sigma(20000, seeded(1), CPU)
    assert sid.max() <= karras_sigma(torch.tensor(0.8)) * (1 + 1e-6)
    assert sid.max() >= karras_sigma(torch.tensor(0.79))


def test_the_references_defaults():
    assert SiDLoss().alpha == 1.2 and SiDLoss().t_max == 0.8  # SiD's alpha and t range
    assert (DMDLoss().low, DMDLoss().high) == (0.02, 0.98)  # DMD2's 2 %..98 %


class Levels:
    def __init__(self) -> None:
        self.asked = []

    def sample(self, n, rng, device):
        self.asked.append((n, rng, device))
        return torch.full((n,), 0.25)


def test_a_loss_queried_at_the_familys_levels_keeps_its_update():
    cfg = SimpleNamespace(loss="vsd", p_mean=-1.2, p_std=1.2, sid_alpha=1.2)
    plain = make_generator_loss(cfg)
    assert isinstance(plain, VSDLoss)
    levels = Levels()
    wrapped = make_generator_loss(cfg, levels)
    assert isinstance(wrapped, AtLevels) and wrapped.fake_side == "score"
    rng = seeded(2)
    assert torch.equal(wrapped.sample_sigma(3, rng, CPU), torch.full((3,), 0.25))
    assert levels.asked == [(3, rng, CPU)]
    x, noise = torch.randn(4, 2, generator=seeded(3)), torch.randn(4, 2, generator=seeded(4))
    sigma = torch.full((4,), 0.5)

    def fake(x_t, s, **cond):
        return 0.5 * x_t

    def target(x_t, s, **cond):
        return 0.25 * x_t

    ours = wrapped(x, sigma, noise, fake, target, NO_CONDITIONS)
    reference = plain(x, sigma, noise, fake, target, NO_CONDITIONS)
    assert torch.equal(ours.loss, reference.loss) and torch.equal(
        ours.score_gap, reference.score_gap
    )
    with pytest.raises(DisbackError, match=r"^unknown loss 'nope' \(known: vsd, dmd, sid"):
        make_generator_loss(SimpleNamespace(loss="nope"))


class Ratio(nn.Module):
    def forward(self, x, sigma, class_labels=None):
        return (x**2).sum(dim=1)


def test_diffratio_logs_the_mean_score_gap():
    x = torch.ones(3, 2, requires_grad=True)
    ratio = Ratio()
    ratio.spec = SimpleNamespace(sigma_data=0.5)
    loss = DiffRatioLoss(0.0, 1.0, "denoiser")
    out = loss(x, torch.ones(3), torch.zeros(3, 2), ratio, None, NO_CONDITIONS)
    # gap = -sigma^2 grad d = -2 x_t at sigma 1 and x_t = x: |gap| = 2 everywhere
    assert isinstance(out, GeneratorLossOutput) and float(out.score_gap) == pytest.approx(2.0)


def test_diffratios_score_weighting_does_not_grow_the_gradient_with_sigma():
    """denoiser: gap = -sigma^2 grad d (VSD's weight); score: -sigma_data^2 grad d, the same at
    sigma = sigma_data and not growing above it. Both reach the generator as sum(gap * x)."""
    ratio = Ratio()
    ratio.spec = SimpleNamespace(sigma_data=0.5)
    x = torch.ones(3, 2, requires_grad=True)
    sigma = torch.tensor([0.5, 2.0, 8.0])

    def gaps(weighting):
        loss = DiffRatioLoss(0.0, 1.0, weighting)
        x.grad = None
        loss(x, sigma, torch.zeros(3, 2), ratio, None, NO_CONDITIONS).loss.backward()
        return x.grad * 3  # the loss is a mean over the batch

    grad_d = 2 * x.detach()  # d = |x_t|^2, x_t = x
    torch.testing.assert_close(gaps("denoiser"), -(sigma**2)[:, None] * grad_d)
    torch.testing.assert_close(gaps("score"), -0.25 * grad_d)
    cfg = SimpleNamespace(p_mean=-0.4, p_std=0.7, ratio_weighting="score")
    from_config = DiffRatioLoss.from_config(cfg)
    assert from_config.weight is RATIO_WEIGHTINGS["score"]
    draws = from_config.sample_sigma(512, seeded(2), CPU)  # VSD's levels, from the config
    assert torch.equal(draws, VSDLoss(-0.4, 0.7).sample_sigma(512, seeded(2), CPU))
    assert torch.equal(
        DiffRatioLoss(-0.4, 0.7, "denoiser").sample_sigma(512, seeded(2), CPU), draws
    )


class Scale(nn.Module):
    """A denoiser that shrinks its input: D(x_t) = c x_t."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x_t, sigma, **cond):
        return self.c * x_t


class Recorder(nn.Module):
    """A one-step generator that records the conditions it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, z, **cond):
        self.seen.append(dict(cond))
        return self.weight * z


class Source:
    def draw(self, n, rng, device):
        return Conditioning({"context": torch.rand(n, 1, generator=rng, device=device)})


def test_the_generator_step_draws_everything_from_the_run_stream_and_passes_the_conditions():
    def run(seed: int) -> tuple[GeneratorLossOutput, torch.Tensor, Recorder]:
        generator = Recorder()
        optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)
        levels = Levels()
        loss = AtLevels(VSDLoss(0.0, 1.0), levels)
        rng = seeded(seed)
        out, norm = generator_step(
            generator,
            optimizer,
            loss,
            Scale(0.5),
            Scale(0.25),
            (4, 2),
            Source(),
            rng,
        )
        assert levels.asked == [(4, rng, rng.device)]  # the levels come from the run's stream
        return out, norm, generator

    out, norm, generator = run(7)
    replay = seeded(7)
    z = torch.randn(4, 2, generator=replay)
    context = torch.rand(4, 1, generator=replay)
    noise = torch.randn(4, 2, generator=replay)  # after the levels (which draw nothing here)
    assert torch.equal(generator.seen[0]["context"], context)
    x_t = z + 0.25 * noise
    expected = ((0.25 * x_t) * z).sum(dim=1).mean()  # VSD: sum over elements of gap * x
    assert torch.allclose(out.loss, expected)
    torch.manual_seed(3)
    again, again_norm, _ = run(7)
    assert torch.equal(out.loss, again.loss) and torch.equal(norm, again_norm)
