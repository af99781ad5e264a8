"""Ground-truth evaluation of vector samples, used by `disback evaluate` and during training."""

from __future__ import annotations

from collections.abc import Callable

import torch

from disback_cli.datasets import get_dataset
from disback_cli.metrics import vector_metrics
from disback_cli.sampling import seeded_noise

REFERENCE_SEED = 987654321  # ground-truth reference sample; the floor uses REFERENCE_SEED + 1


def reference_sample(dataset: str, n: int, seed: int = REFERENCE_SEED) -> torch.Tensor:
    samples, _ = get_dataset(dataset).sample(n, torch.Generator().manual_seed(seed))
    return samples


def evaluate_vectors(samples: torch.Tensor, dataset: str, floor: bool = True) -> dict:
    """Metrics of `samples` against an equally large exact sample of `dataset`.

    With `floor`, the same metrics for a second exact sample: what a perfect generator would score
    at this sample size, so that small numbers can be read honestly.
    """
    mixture = get_dataset(dataset)
    n = len(samples)
    reference = reference_sample(dataset, n)
    report = {
        "dataset": dataset,
        "n": n,
        "reference": {"kind": "exact samples", "n": n, "seed": REFERENCE_SEED},
        "metrics": vector_metrics(samples.float(), reference, mixture, seed=REFERENCE_SEED),
    }
    if floor:
        exact = reference_sample(dataset, n, REFERENCE_SEED + 1)
        report["floor"] = vector_metrics(exact, reference, mixture, seed=REFERENCE_SEED)
    return report


def training_evaluator(
    dataset: str, n: int, data_shape: tuple[int, ...], device: torch.device
) -> Callable[[torch.nn.Module], dict]:
    """Metrics of a generator on fixed seeds 0..n-1, comparable across iterations and runs."""
    mixture = get_dataset(dataset)
    reference = reference_sample(dataset, n)
    z = seeded_noise(range(n), data_shape)[0].to(device)

    def evaluate(generator: torch.nn.Module) -> dict:
        with torch.no_grad():
            samples = generator(z).cpu()
        return vector_metrics(samples, reference, mixture, seed=REFERENCE_SEED)

    return evaluate
