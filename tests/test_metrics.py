import math

import torch

from disback_cli.datasets import ring2d
from disback_cli.metrics import mmd2_rbf, mode_statistics, sliced_wasserstein


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
