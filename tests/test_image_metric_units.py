"""The feature-set distances on sets small enough to work out by hand
(`evaluation/image_metrics.py`): Fréchet distance of one-dimensional Gaussians, refusals,
round-off in a covariance, and k-NN precision/recall at the edge of a ball."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from disback_cli.evaluation.image_metrics import (
    feature_stats,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)


def test_the_frechet_distance_of_scalars_is_the_one_dimensional_formula():
    # (0 - 3)^2 + 1 + 4 - 2 sqrt(1 * 4)
    assert frechet_distance(0.0, 1.0, 3.0, 4.0) == pytest.approx(10.0)


def test_features_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match=r"feature dimensions differ: \(2,\) vs \(3,\)"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3)[:2, :3])


def test_round_off_below_zero_in_a_covariance_is_clipped():
    rank_one = np.outer([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    noisy = rank_one - 1e-12 * np.eye(3)  # eigenvalues -1e-12, -1e-12, 14
    value = frechet_distance(np.zeros(3), noisy, np.zeros(3), noisy)
    assert np.isfinite(value) and abs(value) < 1e-5  # sqrt of 1e-12 round-off: ~1e-6 scale


def test_precision_and_recall_count_a_sample_on_the_edge_of_a_ball():
    """Real 0..3: the 3rd neighbour of 0 and 3 is 3 away. Fake 6 sits on the edge of 3's ball
    (in), 6.5 beyond it; every real point is within a fake ball of radius 14 or 15."""
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[6.0], [6.5], [20.0], [21.0]])
    assert precision_recall(real, fake) == (0.25, 1.0)
    assert precision_recall(real, fake, chunk=1) == (0.25, 1.0)
    assert precision_recall(real, fake, k=1) == (0.0, 0.0)


def test_kid_defaults_are_clean_fids():
    """100 subsets of at most 1000: sets of 1001 and 1002 are subsampled to 1000."""
    defaults = inspect.signature(kernel_inception_distance).parameters
    assert (defaults["subsets"].default, defaults["subset_size"].default) == (100, 1000)
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(1001, 4)), rng.normal(0.3, 1.0, size=(1002, 4))
    explicit = kernel_inception_distance(f1, f2, subsets=2, subset_size=1000, seed=0)
    assert kernel_inception_distance(f1, f2, subsets=2) == explicit
    assert kernel_inception_distance(f1, f2, subsets=2, seed=1) != explicit


def test_kid_subsets_are_as_large_as_the_smaller_set():
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=(30, 4)), rng.normal(size=(80, 4))
    assert np.isfinite(kernel_inception_distance(small, large, subsets=3))
    assert np.isfinite(kernel_inception_distance(large, small, subsets=3))


def test_float32_features_are_scored_in_float64():
    """Inception features arrive in float32; every distance is computed in float64, so it
    equals the float64 computation on the same values exactly."""
    rng = np.random.default_rng(2)
    a32 = rng.normal(size=(200, 8)).astype(np.float32)
    b32 = (rng.normal(size=(180, 8)) * 1.3 + 0.2).astype(np.float32)
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    stats32, stats64 = feature_stats(a32), feature_stats(b32)
    assert stats32[1].dtype == np.float64
    assert np.array_equal(stats32[0], feature_stats(a64)[0])
    assert np.array_equal(stats32[1], feature_stats(a64)[1])
    assert frechet_distance(*stats32, *stats64) == frechet_distance(
        *feature_stats(a64), *feature_stats(b64)
    )
    mu, sigma = feature_stats(a64)
    assert frechet_distance(mu.astype(np.float32), sigma.astype(np.float32), mu, sigma) == (
        frechet_distance(
            mu.astype(np.float32).astype(np.float64),
            sigma.astype(np.float32).astype(np.float64),
            mu,
            sigma,
        )
    )
    assert kernel_inception_distance(a32, b32, subsets=5) == kernel_inception_distance(
        a64, b64, subsets=5
    )
    assert precision_recall(a32, b32) == precision_recall(a64, b64)


def test_kid_at_its_default_subsets_is_a_hundred_subsets():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(12, 3)), rng.normal(size=(14, 3))
    assert kernel_inception_distance(f1, f2) == kernel_inception_distance(f1, f2, subsets=100)


def test_a_kid_subset_is_subset_size_rows_of_each_set_drawn_by_the_seed():
    """clean-fid's procedure: per subset, m = min(sizes, subset_size) rows of the second set,
    then of the first, drawn without replacement; KID is their unbiased MMD^2."""
    from test_image_metrics import brute_force_unbiased_mmd2

    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(9, 3)), rng.normal(size=(11, 3))
    draw = np.random.default_rng(7)
    x = f2[draw.choice(11, 3, replace=False)]
    y = f1[draw.choice(9, 3, replace=False)]
    expected = brute_force_unbiased_mmd2(y.tolist(), x.tolist())
    kid = kernel_inception_distance(f1, f2, subsets=1, subset_size=3, seed=7)
    assert kid == pytest.approx(expected, rel=1e-12)


def test_a_float32_covariance_is_summed_in_float64():
    """The trace of a float32 covariance, accumulated in float32, loses 2^-30 next to 1."""
    small = np.diag(np.array([1.0, 2.0**-30], dtype=np.float32))
    for args in (
        (np.zeros(2), np.zeros((2, 2)), np.zeros(2), small),
        (np.zeros(2), small, np.zeros(2), np.zeros((2, 2))),
    ):
        assert frechet_distance(*args) == 1.0 + 2.0**-30
