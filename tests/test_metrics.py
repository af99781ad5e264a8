import math

import torch

from disback_cli.evaluation.datasets import ring2d
from disback_cli.evaluation.vectors import (
    mmd2_rbf,
    mode_statistics,
    sliced_wasserstein,
)


def test_mmd_is_near_zero_for_same_law_and_large_for_different():
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 2, generator=rng), torch.randn(1500, 2, generator=rng)
    assert abs(mmd2_rbf(a, b)) < 0.005
    assert mmd2_rbf(a, b + 1.0) > 0.2


def test_sliced_w2_of_a_shift_is_shift_over_sqrt_dim():
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 4, generator=rng)
    shift = torch.tensor([2.0, 0.0, 0.0, 0.0])
    value = sliced_wasserstein(x, x + shift, torch.Generator().manual_seed(1), projections=2000)
    assert abs(value - 2.0 / math.sqrt(4)) < 0.05


def test_mode_statistics_detect_dropped_modes_and_imprecise_samples():
    mixture = ring2d()
    x, component = mixture.sample(4000, torch.Generator().manual_seed(0))
    full = mode_statistics(x, mixture)
    assert full["modes_covered"] == 8 and full["precision"] > 0.98 and full["mode_tv"] < 0.05
    half = mode_statistics(x[component < 4], mixture)
    assert half["modes_covered"] == 4
    assert abs(half["mode_tv"] - 0.5) < 0.02
    blurred = mode_statistics(x * 0.7, mixture)  # points pulled inside the ring
    assert blurred["precision"] < 0.01


def test_mmd_in_blocks_equals_the_whole_matrix_and_large_sets_are_capped(monkeypatch):
    """Sets larger than one block are summed block by block (memory stays flat: 200 000 samples
    once asked for 320 GB); beyond MMD_MAX_SAMPLES only the first samples count. (Blocks and cap
    shrunk by 16 and 10 keep the sums exact and the test fast.)"""
    from disback_cli.evaluation import vectors as metrics

    monkeypatch.setattr(metrics, "MMD_BLOCK", metrics.MMD_BLOCK // 16)  # 256 rows
    monkeypatch.setattr(metrics, "MMD_MAX_SAMPLES", metrics.MMD_MAX_SAMPLES // 10)  # 1000
    rng = torch.Generator().manual_seed(0)
    x, y = torch.randn(700, 2, generator=rng), torch.randn(600, 2, generator=rng) + 0.2
    d = {
        "xx": torch.cdist(x.double(), x.double()) ** 2,
        "yy": torch.cdist(y.double(), y.double()) ** 2,
        "xy": torch.cdist(x.double(), y.double()) ** 2,
    }
    whole = 0.0
    for h in metrics.MMD_BANDWIDTHS:
        k = {key: torch.exp(-v / (2 * h * h)) for key, v in d.items()}
        whole += (k["xx"].sum() - k["xx"].trace()).item() / (700 * 699)
        whole += (k["yy"].sum() - k["yy"].trace()).item() / (600 * 599)
        whole -= 2 * k["xy"].mean().item()
    assert abs(metrics.mmd2_rbf(x, y) - whole) < 1e-12
    big = torch.cat([x, x])
    assert metrics.mmd2_rbf(big, y) == metrics.mmd2_rbf(big[:1000], y)
    assert metrics.mmd2_rbf(big, y) != metrics.mmd2_rbf(big[:999], y)


def test_sliced_w2_of_a_shifted_set_is_the_shift():
    """In 1-D every projection is +-x, so the sliced W2 between a set and the set moved by c is
    exactly |c| (a W2, not its square)."""
    x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0))
    distance = sliced_wasserstein(x, x + 0.5, torch.Generator().manual_seed(1))
    assert math.isclose(distance, 0.5, rel_tol=1e-9)
