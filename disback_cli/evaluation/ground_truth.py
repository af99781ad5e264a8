"""Evaluation against ground truth the built-in teachers know exactly (the ring's mixture, the
digits): what `disback evaluate` reports, and what backtrack logs with --eval-every."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from disback_cli.errors import DisbackError
from disback_cli.evaluation.datasets import get_dataset
from disback_cli.evaluation.digits import DigitsDetector, digits_scores, heldout_floor
from disback_cli.evaluation.reports import make_report
from disback_cli.evaluation.shapes import heldout_floor as shapes_floor
from disback_cli.evaluation.shapes import shapes_scores
from disback_cli.evaluation.vectors import vector_metrics
from disback_cli.method.sampling import seeded_noise
from disback_cli.models.conditioning import ConditionSource
from disback_cli.store.images import to_uint8

REFERENCE_SEED = 987654321  # ground-truth reference sample; the floor uses REFERENCE_SEED + 1
HELD_OUT = 797  # held-out real digits, the floor of FD-digits


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
        report["floor"] = vector_floor(dataset, n)
    return report


def vector_floor(dataset: str, n: int) -> dict:
    """The metrics of a second exact sample of `n`: what a perfect generator scores at this n."""
    reference = reference_sample(dataset, n)
    exact = reference_sample(dataset, n, REFERENCE_SEED + 1)
    return {"n": n, **vector_metrics(exact, reference, get_dataset(dataset), seed=REFERENCE_SEED)}


def _check_digits(images: np.ndarray) -> None:
    if images.shape[1:] != (8, 8, 1) or len(images) < 2:
        raise DisbackError(
            f"FD-digits needs at least 2 images of 8x8x1, got {len(images)} of "
            f"{'x'.join(map(str, images.shape[1:]))}"
        )


def evaluate_digits(images: np.ndarray, floor: bool = True) -> dict:
    """FD-digits and class coverage of uint8 (N, 8, 8, 1) digits, with the held-out floor."""
    _check_digits(images)
    detector = DigitsDetector()
    report = {
        "kind": "digits",
        "dataset": "digits",
        "metric": "FD-digits",
        "detector": detector.describe(),
        "reference": {"kind": "train split of the built-in digits", "n": 1000},
        "n": len(images),
        "metrics": digits_scores(images, detector),
    }
    if floor:
        report["floor"] = heldout_floor(detector, len(images))
    return report


def shapes_report(parts: list[tuple[np.ndarray, dict]], labels: np.ndarray | None) -> dict:
    """`disback evaluate` on built-in shapes: mode statistics of each part (uint8 images),
    beside held-out real images at the same n; `labels`: the classes they were drawn for."""
    results = []
    for images, where in parts:
        if images.shape[1:] != (16, 16, 3):
            raise DisbackError(f"shapes scores need 16x16x3 images, got {images.shape[1:]}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        span = where.get("images") or where.get("samples")
        part_labels = None
        if labels is not None and span is not None:
            part_labels = torch.as_tensor(labels[span[0] : span[1] + 1])
        results.append({**shapes_scores(x, part_labels), **where})
    floor = shapes_floor(min(results[0]["n"], 5000))
    return make_report(
        "shapes",
        "template distance",
        "template_distance",
        results,
        dataset="shapes",
        reference={"kind": "the 64 modes' rendered variants", "n": 9600},
        samples={},
        floor=floor,
    )


def training_evaluator(
    dataset: str,
    n: int,
    data_shape: tuple[int, ...],
    conditions: ConditionSource,
    device: torch.device,
    chunk: int,
) -> Callable[[torch.nn.Module], dict]:
    """Metrics of a generator on fixed seeds 0..n-1, comparable across iterations and runs.
    The generator sees them `chunk` at a time (the training batch), never all at once."""
    z, cond = seeded_noise(range(n), data_shape, conditions)
    z, cond = z.to(device), cond.to(device)

    def samples(generator: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    generator(z[i : i + chunk], **cond.rows(slice(i, i + chunk))).cpu()
                    for i in range(0, n, chunk)
                ]
            )

    if dataset == "digits":
        detector = DigitsDetector()
        return lambda generator: digits_scores(to_uint8(samples(generator)), detector)
    if dataset == "shapes":
        labels = torch.as_tensor(conditions.labels(cond.to("cpu")))
        return lambda generator: shapes_scores(samples(generator).clamp(-1, 1), labels)
    mixture = get_dataset(dataset)
    reference = reference_sample(dataset, n)
    return lambda generator: vector_metrics(samples(generator), reference, mixture, REFERENCE_SEED)


def vector_report(
    parts: list[tuple[torch.Tensor, dict]],
    dataset: str | None,
    reference: tuple[torch.Tensor, dict] | None = None,
) -> dict:
    """`disback evaluate` on vector samples: each part (samples, where they came from) against
    an exact sample of `dataset` as large as it, with the exact-vs-exact floor; or against the
    given `reference` samples (the mode statistics then need a known `dataset`, and there is no
    floor)."""
    mixture = get_dataset(dataset) if dataset is not None else None
    results = []
    for samples, where in parts:
        if reference is None:
            metrics = evaluate_vectors(samples, dataset, floor=False)["metrics"]
        else:
            metrics = vector_metrics(
                samples.float(), reference[0].float(), mixture, seed=REFERENCE_SEED
            )
        results.append({"n": len(samples), **metrics, **where})
    n = results[0]["n"]
    if reference is None:
        against = {"kind": "exact samples", "n": n, "seed": REFERENCE_SEED}
        floor = vector_floor(dataset, n)
    else:
        against, floor = {"kind": "samples", "n": len(reference[0]), **reference[1]}, None
    return make_report(
        "vector",
        "mmd2",
        "mmd2",
        results,
        dataset=dataset,
        reference=against,
        samples={},
        floor=floor,
    )


def digits_report(parts: list[tuple[np.ndarray, dict]]) -> dict:
    """`disback evaluate` on digits: FD-digits and class coverage of each part against the train
    split, beside held-out real digits at the same n. There are 797 held-out digits: a larger
    part is also scored on its first 797 (`at_floor_n`), so the comparison is at equal n."""
    detector = DigitsDetector()
    results = []
    for images, where in parts:
        _check_digits(images)
        result = {**digits_scores(images, detector), **where}
        if len(images) > HELD_OUT:
            result["at_floor_n"] = digits_scores(images[:HELD_OUT], detector)
        results.append(result)
    floor = heldout_floor(detector, min(results[0]["n"], HELD_OUT))
    return make_report(
        "digits",
        "FD-digits",
        "fd_digits",
        results,
        dataset="digits",
        reference={"kind": "train split of the built-in digits", "n": 1000},
        samples={},
        detector=detector.describe(),
        floor=floor,
    )
