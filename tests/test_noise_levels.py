"""Noise levels (`method.noise`) pinned value by value: EDM's rho grid, the uniform Karras index,
the log-normal, the discrete timesteps of a DDPM teacher, and that every draw comes from the run's
own stream (so resumes and torchrun ranks see the same numbers). Written against mutmut's
survivors of the module (benchmarks/mutation_tool.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from disback_cli.errors import ConfigError
from disback_cli.method.noise import (
    KARRAS_LEVELS,
    TrainingSigma,
    karras_sigma,
    sample_karras_index_sigma,
    sample_lognormal_sigma,
)

CPU = torch.device("cpu")


def rho_grid(t: float, lo: float = 0.002, hi: float = 80.0, rho: float = 7.0) -> float:
    return (lo ** (1 / rho) + t * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho


def test_karras_sigma_is_edms_rho_7_grid():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    expected = torch.tensor([rho_grid(v) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(karras_sigma(t), expected, rtol=1e-12, atol=0)
    # by hand: ((0.002^(1/7) + 80^(1/7)) / 2)^7 = (1.14088)^7 = 2.5152
    assert abs(float(karras_sigma(torch.tensor(0.5, dtype=torch.float64))) - 2.5152) < 1e-3


def draws(sampler, seed: int = 0, **kwargs) -> torch.Tensor:
    return sampler(4096, rng=torch.Generator().manual_seed(seed), device=CPU, **kwargs)


def test_a_karras_index_covers_every_level_from_its_stream():
    sigma = draws(sample_karras_index_sigma)
    levels = karras_sigma(torch.arange(KARRAS_LEVELS) / (KARRAS_LEVELS - 1))
    index = torch.searchsorted(levels, sigma.clamp(max=80.0) * (1 - 1e-6))
    assert index.min() == 0 and index.max() == KARRAS_LEVELS - 1  # both ends drawn
    torch.testing.assert_close(sigma, levels[index], rtol=1e-5, atol=0)
    assert torch.equal(sigma, draws(sample_karras_index_sigma))  # the stream given, not global
    torch.manual_seed(123)
    assert not torch.equal(sigma, draws(sample_karras_index_sigma, seed=1))
    low = draws(sample_karras_index_sigma, low=20, high=980)
    assert low.min() >= levels[20] * (1 - 1e-6) and low.max() <= levels[979] * (1 + 1e-6)


def test_the_log_normal_has_the_mean_and_spread_it_is_given():
    sigma = draws(sample_lognormal_sigma, p_mean=-1.2, p_std=1.2)
    assert abs(float(sigma.log().mean()) + 1.2) < 0.06
    assert abs(float(sigma.log().std()) - 1.2) < 0.06
    torch.manual_seed(7)  # the global stream must not matter
    assert torch.equal(sigma, draws(sample_lognormal_sigma, p_mean=-1.2, p_std=1.2))


def config(kind: str, p_mean: float = -0.4, p_std: float = 0.7) -> SimpleNamespace:
    return SimpleNamespace(dsm_sigma=kind, p_mean=p_mean, p_std=p_std)


def test_training_levels_come_from_the_config_and_the_teachers_timesteps():
    lognormal = TrainingSigma.of(config("lognormal"))
    assert (lognormal.kind, lognormal.p_mean, lognormal.p_std) == ("lognormal", -0.4, 0.7)
    log_sigma = lognormal.sample(4096, torch.Generator().manual_seed(2), CPU).log()
    torch.manual_seed(11)  # only the run's stream may matter
    assert torch.equal(
        log_sigma, lognormal.sample(4096, torch.Generator().manual_seed(2), CPU).log()
    )
    assert abs(float(log_sigma.mean()) + 0.4) < 0.05 and abs(float(log_sigma.std()) - 0.7) < 0.05
    karras = TrainingSigma.of(config("karras")).sample(512, torch.Generator().manual_seed(2), CPU)
    assert torch.equal(
        karras, sample_karras_index_sigma(512, torch.Generator().manual_seed(2), CPU)
    )
    table = torch.tensor([0.1, 0.5, 2.0, 9.0])
    teacher = SimpleNamespace(sigmas=table)
    discrete = TrainingSigma.of(config("discrete"), teacher)
    assert discrete.kind == "discrete" and discrete.table is table
    drawn = discrete.sample(512, torch.Generator().manual_seed(3), CPU)
    assert set(drawn.tolist()) == set(table.tolist())  # every timestep, only timesteps
    again = TrainingSigma.of(config("discrete"), teacher).sample(
        512, torch.Generator().manual_seed(3), CPU
    )
    assert torch.equal(drawn, again)
    with pytest.raises(ConfigError, match=r"^discrete noise levels need a discrete-time \("):
        TrainingSigma.of(config("discrete"), SimpleNamespace())
    assert math.isclose(float(karras.max()), 80.0, rel_tol=0.2)
