"""The vector metrics on sample sets built by hand (`evaluation/vectors.py`), where every number
can be worked out on paper: precision, coverage at its threshold, mode balance, sliced W2 of a
shifted grid, and what `vector_metrics` reports."""

from __future__ import annotations

import pytest
import torch

from disback_cli.evaluation.datasets import GaussianMixture, ring2d
from disback_cli.evaluation.vectors import (
    mmd2_rbf,
    mode_statistics,
    sliced_wasserstein,
    vector_metrics,
)

RING = ring2d()  # 8 modes, std 0.08


def at_modes(counts: dict[int, int]) -> torch.Tensor:
    return torch.cat([RING.means[k].repeat(n, 1) for k, n in counts.items()]).float()


def test_precision_coverage_and_balance_of_a_hand_built_set():
    """30 samples on mode 0, 10 on mode 1, 10 far from every mode (50 in all)."""
    x = torch.cat([at_modes({0: 30, 1: 10}), torch.full((10, 2), 10.0)])
    stats = mode_statistics(x, RING)
    assert stats["precision"] == pytest.approx(40 / 50)
    assert (stats["modes_covered"], stats["modes_total"]) == (2, 8)
    # balance over the 40 precise samples: 0.75 and 0.25 against 1/8 each, 0 on six modes
    assert stats["mode_tv"] == pytest.approx(0.5 * (0.625 + 0.125 + 6 * 0.125))


def test_a_sample_counts_as_precise_up_to_three_standard_deviations():
    offsets = torch.tensor([[2.9 * RING.std, 0.0], [3.1 * RING.std, 0.0]])
    x = RING.means[0].float() + offsets.float()
    assert mode_statistics(x, RING)["precision"] == 0.5
    assert mode_statistics(x, RING, within=4.0)["precision"] == 1.0


def test_a_mode_is_covered_from_a_fifth_of_its_fair_share_on():
    """80 samples: a fair share is 10, a fifth of it 2; a mode with 2 counts, with 1 not."""
    x = at_modes({0: 77, 1: 2, 2: 1})
    assert mode_statistics(x, RING)["modes_covered"] == 2


def test_no_precise_sample_is_the_worst_balance():
    stats = mode_statistics(torch.full((5, 2), 10.0), RING)
    assert stats == {"precision": 0.0, "modes_covered": 0, "modes_total": 8, "mode_tv": 1.0}


def test_sliced_w2_of_a_grid_against_its_shift_in_one_dimension():
    """In 1-D every direction is +-1: the distance is the shift, whatever the seed."""
    grid = torch.arange(512, dtype=torch.float64).reshape(-1, 1)
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        assert sliced_wasserstein(grid, grid + 3, generator) == pytest.approx(3.0)


def test_sliced_w2_projects_on_unit_directions_drawn_from_the_generator():
    x = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))
    y = 2 * torch.randn(300, 3, generator=torch.Generator().manual_seed(1))
    first = sliced_wasserstein(x, y, torch.Generator().manual_seed(5), projections=64)
    assert first == sliced_wasserstein(x, y, torch.Generator().manual_seed(5), projections=64)
    # by hand: unit directions, 512 mid-point quantile levels, root of the mean square gap
    directions = torch.randn(3, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    levels = (torch.arange(512, dtype=torch.float64) + 0.5) / 512
    gaps = torch.quantile(x.double() @ directions, levels, dim=0) - torch.quantile(
        y.double() @ directions, levels, dim=0
    )
    assert first == pytest.approx(gaps.pow(2).mean().sqrt().item(), rel=1e-12)


def test_vector_metrics_reports_the_distances_and_with_a_mixture_the_mode_statistics():
    samples, _ = RING.sample(400, torch.Generator().manual_seed(0))
    reference, _ = RING.sample(400, torch.Generator().manual_seed(1))
    full = vector_metrics(samples, reference, RING, seed=7)
    sw = sliced_wasserstein(samples, reference, torch.Generator().manual_seed(7), projections=256)
    assert full["mmd2"] == mmd2_rbf(samples, reference) and full["sliced_w2"] == sw
    assert {k: full[k] for k in ("precision", "modes_covered", "modes_total", "mode_tv")} == (
        mode_statistics(samples, RING)
    )
    assert vector_metrics(samples, reference, None, seed=7) == {
        "mmd2": full["mmd2"],
        "sliced_w2": sw,
    }


def test_three_standard_deviations_exactly_is_still_precise():
    mixture = GaussianMixture(means=torch.zeros(1, 2), std=0.5, weights=torch.ones(1))
    x = torch.tensor([[1.5, 0.0], [0.0, -1.5], [1.5000001, 0.0]])  # 3 std, 3 std, just beyond
    assert mode_statistics(x, mixture)["precision"] == pytest.approx(2 / 3)
