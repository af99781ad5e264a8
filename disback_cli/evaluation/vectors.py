"""Distances between a sample set and ground truth for vector data (MMD, sliced W2, mode stats)."""

from __future__ import annotations

import torch

from disback_cli.evaluation.datasets import GaussianMixture

MMD_BANDWIDTHS = (0.05, 0.2, 1.0)


MMD_MAX_SAMPLES = 10_000  # its cost grows with n^2: larger sets use their first 10 000
MMD_BLOCK = 4096  # rows of a kernel matrix in memory at once


def _kernel_sums(a: torch.Tensor, b: torch.Tensor, bandwidths, same: bool) -> list[float]:
    """Per bandwidth h, the sum of exp(-|a_i - b_j|^2 / (2 h^2)) over all pairs (i != j when
    `same`), a block of rows at a time so that memory stays flat (one block, the arithmetic of a
    single matrix, up to MMD_BLOCK samples)."""
    totals = [0.0] * len(bandwidths)
    for start in range(0, len(a), MMD_BLOCK):
        squared = torch.cdist(a[start : start + MMD_BLOCK], b) ** 2
        for i, h in enumerate(bandwidths):
            kernel = torch.exp(-squared / (2 * h * h))
            totals[i] += kernel.sum().item()
            if same:
                totals[i] -= kernel.diagonal(offset=start).sum().item()
    return totals


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=MMD_BANDWIDTHS) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-|a-b|^2 / (2 h^2)), on at most
    MMD_MAX_SAMPLES of each set."""
    x = x[:MMD_MAX_SAMPLES].to(torch.float64)
    y = y[:MMD_MAX_SAMPLES].to(torch.float64)
    n, m = len(x), len(y)
    total = 0.0
    for xx, yy, xy in zip(
        _kernel_sums(x, x, bandwidths, True),
        _kernel_sums(y, y, bandwidths, True),
        _kernel_sums(x, y, bandwidths, False),
        strict=True,
    ):
        total += xx / (n * (n - 1))
        total += yy / (m * (m - 1))
        total -= 2 * xy / (n * m)
    return total


def sliced_wasserstein(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, projections: int = 256
) -> float:
    """Sliced 2-Wasserstein distance: W2 between 1-D projections, averaged over directions."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    directions = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    levels = (torch.arange(512, dtype=torch.float64) + 0.5) / 512
    qx = torch.quantile(x @ directions, levels, dim=0)
    qy = torch.quantile(y @ directions, levels, dim=0)
    return ((qx - qy) ** 2).mean().sqrt().item()


def mode_statistics(x: torch.Tensor, mixture: GaussianMixture, within: float = 3.0) -> dict:
    """Precision (share within `within` std of a mode), modes covered and mode balance.

    A mode counts as covered when it holds at least 20 % of its fair share of all samples;
    `mode_tv` is the total variation between the histogram of precise samples and the weights.
    """
    index, dist = mixture.nearest_mode(x)
    precise = dist <= within
    counts = torch.bincount(index[precise], minlength=len(mixture.weights)).to(torch.float64)
    weights = mixture.weights.to(torch.float64)
    covered = counts / len(x) >= 0.2 * weights
    tv = 0.5 * (counts / counts.sum() - weights).abs().sum().item() if counts.sum() else 1.0
    return {
        "precision": precise.to(torch.float64).mean().item(),
        "modes_covered": int(covered.sum()),
        "modes_total": len(weights),
        "mode_tv": tv,
    }


def vector_metrics(
    samples: torch.Tensor, reference: torch.Tensor, mixture: GaussianMixture | None, seed: int
) -> dict:
    """All vector metrics of `samples` against a `reference` sample; the mode statistics need the
    ground truth's `mixture` (without it, only the distances)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "mmd2": mmd2_rbf(samples, reference),
        "sliced_w2": sliced_wasserstein(samples, reference, generator),
        **(mode_statistics(samples, mixture) if mixture is not None else {}),
    }
