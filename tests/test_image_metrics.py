import math

import numpy as np
import pytest

from disback_cli.evaluation.image_metrics import (
    feature_stats,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + sum(a + b - 2 * math.sqrt(a * b) for a, b in zip(v1, v2, strict=True))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
        expected, abs=1e-10
    )


def test_frechet_distance_with_non_commuting_covariances():
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    # For a 2x2 matrix with positive eigenvalues, tr sqrtm(M) = sqrt(tr M + 2 sqrt(det M)).
    product = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(np.zeros(2), s2, np.zeros(2), s1) == pytest.approx(expected, abs=1e-10)


def test_frechet_distance_of_identical_statistics_is_zero_even_when_singular():
    features = np.random.default_rng(0).normal(size=(50, 64))  # rank-deficient covariance
    mu, sigma = feature_stats(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma) * len(mu)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_feature_stats_use_the_unbiased_covariance():
    x = np.array([[0.0], [2.0]])
    mu, sigma = feature_stats(x)
    assert mu.tolist() == [1.0] and sigma.tolist() == 2.0  # (1 + 1) / (2 - 1)


def test_kid_is_near_zero_for_one_law_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(800, 16)), rng.normal(size=(800, 16))
    same = kernel_inception_distance(a, b, subsets=20, subset_size=400)
    shifted = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=400)
    assert abs(same) < 0.01 and shifted > 0.1
    assert same == kernel_inception_distance(a, b, subsets=20, subset_size=400)  # seeded


def test_precision_and_recall_separate_quality_from_coverage():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0]])
    real = np.concatenate([c + rng.normal(size=(300, 2)) * 0.3 for c in centres])
    half = centres[0] + rng.normal(size=(600, 2)) * 0.3  # only one of the two modes
    precision, recall = precision_recall(real, half)
    assert precision > 0.95 and 0.4 < recall < 0.6
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def brute_force_unbiased_mmd2(x: list[list[float]], y: list[list[float]]) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    d = len(x[0])

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b, strict=True)) / d + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd2_of_the_cubic_kernel():
    """With one subset of all samples (a permutation, which MMD^2 ignores) KID is the unbiased
    estimator itself: within-set sums over i != j divided by m (m - 1), not m^2."""
    a = [[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [2.0, 0.0, -1.0], [-0.5, 0.5, 1.5], [1.0, 1.0, 1.0]]
    b = [[0.5, 0.0, 1.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.5, -0.5, 2.0], [0.5, 1.5, -1.0]]
    expected = brute_force_unbiased_mmd2(b, a)
    assert expected == pytest.approx(brute_force_unbiased_mmd2(a, b), rel=1e-12)  # symmetric
    kid = kernel_inception_distance(np.array(a), np.array(b), subsets=1, subset_size=5)
    assert kid == pytest.approx(expected, rel=1e-12)
    # a set against itself: the cross term keeps the diagonal k(x, x), the within terms do not,
    # so the estimate is negative (a biased one, all over m^2, would be exactly zero)
    same = kernel_inception_distance(np.array(a), np.array(a), subsets=3, subset_size=5)
    assert same == pytest.approx(brute_force_unbiased_mmd2(a, a), rel=1e-12)
    assert same < -1
