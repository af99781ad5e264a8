"""Distances between feature sets: Fréchet distance, KID and k-NN precision/recall.

All in float64. The Fréchet distance never forms sqrtm(S1 S2) directly: with R = S1^(1/2)
(eigendecomposition, negative round-off clipped), Tr sqrtm(S1 S2) = sum sqrt(eig(R S2 R)), the
eigenvalues of a symmetric PSD matrix, so there is no complex round-off to discard.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (N-1), as in EDM's reference statistics."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) of two Gaussians."""
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}")
    root = _psd_sqrt(s1)
    cross = np.linalg.eigvalsh(root @ s2 @ root)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over
    random subsets (clean-fid's defaults: 100 subsets of at most 1000)."""
    rng = np.random.default_rng(seed)
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    d = f1.shape[1]
    m = min(len(f1), len(f2), subset_size)
    total = 0.0
    for _ in range(subsets):
        x = f2[rng.choice(len(f2), m, replace=False)]
        y = f1[rng.choice(len(f1), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2 * kxy.mean()
    return float(total / subsets)


def _kth_neighbour_radius(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for start in range(0, len(features), chunk):
        dist = torch.cdist(features[start : start + chunk], features)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int
) -> float:
    inside = []
    for start in range(0, len(queries), chunk):
        dist = torch.cdist(queries[start : start + chunk], support)
        inside.append((dist <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.

    Precision: share of fake samples inside some real sample's k-NN ball; recall: the reverse.
    """
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    precision = _coverage(fake_t, real_t, _kth_neighbour_radius(real_t, k, chunk), chunk)
    recall = _coverage(real_t, fake_t, _kth_neighbour_radius(fake_t, k, chunk), chunk)
    return precision, recall
