"""`disback evaluate`'s work: samples (a folder, an .npz, or a run sampled on the fly) scored
against the exact data they should follow (vectors, the built-in digits and shapes) or reference
statistics (FID, KID, precision/recall on Inception features), with the CLIP score of text-to-image
samples; and reference statistics written for a data set.

Under torchrun, Inception features are extracted by all ranks (batches round-robin) and scored on
rank 0; the cheap vector, digits and shapes evaluations run on rank 0 alone (others get None).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.evaluation import detectors
from disback_cli.evaluation.clip_score import ClipScorer, clip_scores, read_prompt_listing
from disback_cli.evaluation.datasets import DATASETS, get_dataset
from disback_cli.evaluation.detectors import InceptionDetector, locate_inception
from disback_cli.evaluation.ground_truth import digits_report, shapes_report, vector_report
from disback_cli.evaluation.image_eval import (
    Reference,
    evaluate_images,
    load_reference,
    write_reference,
)
from disback_cli.evaluation.image_io import ImageSet, generated_images, open_images
from disback_cli.evaluation.reports import make_report, summarize
from disback_cli.method.generator import load_generator
from disback_cli.method.sampling import MAX_SEED, one_step_batches, parse_seeds
from disback_cli.models.conditioning import condition_source
from disback_cli.runtime.parallel import Execution
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.fileio import parse_json, read_regular_file
from disback_cli.store.manifests import generator_file_of_run
from disback_cli.store.npzfile import read_npz
from disback_cli.store.samples import LABELS, read_provenance, read_samples, seed_ranges

# Image data sets the built-in metrics score without reference statistics.
BUILTIN_IMAGE_METRICS = {"digits", "shapes"}


@dataclass(frozen=True)
class Scoring:
    """How samples are scored: the ground truth (`dataset`) or reference statistics (`ref`), the
    detector's mode and weights, disjoint `repeats`, and a CLIP model for prompted samples."""

    ref: Path | None = None
    dataset: str | None = None
    mode: str | None = None
    inception: Path | None = None
    batch: int = 64
    workers: int = 4
    repeats: int = 1
    clip: Path | None = None
    clip_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.dataset is not None and self.dataset not in DATASETS:
            known = ", ".join(DATASETS)
            raise ConfigError(f"--dataset {self.dataset!r}: no such data set (known: {known})")

    def detector(self, device, reference: Reference | None) -> InceptionDetector:
        recorded = (reference.meta.get("detector") or {}) if reference else {}
        mode = self.mode or recorded.get("mode") or "legacy_tensorflow"
        path = locate_inception(self.inception)
        return InceptionDetector(path, mode, device, detectors.INCEPTION_SHA256, self.workers)


def reference_statistics(
    data: Path, out: Path, n: int | None, scoring: Scoring, ex: Execution, reporter: Reporter
) -> dict:
    """Write the Inception statistics of a data set (`disback evaluate ref`)."""
    images = open_images(data)
    if images is None:
        raise DisbackError(f"{data}: reference statistics need images")
    detector = scoring.detector(ex.device, None)
    return write_reference(images, detector, out, scoring.batch, n, reporter, ex)


def seed_sets(n: int | None, seeds: str | None, repeats: int) -> list[list[int]]:
    """The seeds of each repeat: `--seeds` (or 0..n-1, default 50 000) for the first, each next
    one shifted past the previous."""
    first = parse_seeds(seeds) if seeds else list(range(n or 50_000))
    if len(first) < 2:
        raise ConfigError(f"{len(first)} samples per repeat; evaluation needs at least 2")
    if (max(first) + 1) * repeats > MAX_SEED:
        raise ConfigError(f"seeds of {repeats} repeats would pass {MAX_SEED}")
    return [[s + r * len(first) for s in first] for r in range(repeats)]


def evaluate_run(
    trajectory: Path,
    name: str,
    sets: list[list[int]],
    scoring: Scoring,
    verify: bool,
    ex: Execution,
    reporter: Reporter,
) -> dict | None:
    """Score the EMA generator of a backtrack run, sampled on the fly for the seed `sets`."""
    path, sha = generator_file_of_run(trajectory, name, "ema")
    generator, info = load_generator(path, ex.device, sha, verify)
    denoiser, report = generator.denoiser, None
    dataset = scoring.dataset or info.get("dataset")
    seeds_of = [{"seeds": [s[0], s[-1]]} for s in sets]
    if len(denoiser.data_shape) != 3:
        if ex.is_main:
            conditions = condition_source(denoiser.label_dim)
            parts = [
                (_one_step(generator, s, conditions, ex.device), range_)
                for s, range_ in zip(sets, seeds_of, strict=True)
            ]
            provenance = {"dataset": info.get("dataset")}
            report = _vector_evaluation(parts, scoring.dataset, provenance, scoring.ref)
    elif scoring.ref is None and dataset in BUILTIN_IMAGE_METRICS:
        if ex.is_main:
            parts = [
                (generated_images(generator, s, scoring.batch, ex.device, "run").array(), range_)
                for s, range_ in zip(sets, seeds_of, strict=True)
            ]
            report = _builtin_image_report(dataset, parts, None)
    else:
        reference = _reference(scoring.ref)
        where = f"run {trajectory}"
        parts = [
            (generated_images(generator, s, scoring.batch, ex.device, where), 0, len(s), range_)
            for s, range_ in zip(sets, seeds_of, strict=True)
        ]
        detector = scoring.detector(ex.device, reference)
        report = evaluate_images(parts, detector, reference, scoring.batch, reporter, ex)
    if report is not None:
        provenance = {"generator": str(path), "generator_sha256": sha, "step": info.get("step")}
        run = {"run": str(Path(trajectory).absolute()), "name": name, **provenance}
        report["samples"] = {**run, "count": sum(len(s) for s in sets)}
    return report


def evaluate_samples(
    source: Path, any_images: bool, scoring: Scoring, ex: Execution, reporter: Reporter
) -> dict | None:
    """Score a sample set: an .npz of vectors, or images (a folder, an .npz, a dataset zip)."""
    images = open_images(source, any_images)
    repeats, report = scoring.repeats, None
    if images is None:
        if not ex.is_main:
            return None
        samples, meta = read_samples(source)
        parts = [
            (samples[a:b], {"samples": [a, b - 1]})
            for a, b in _parts(len(samples), repeats, "samples")
        ]
        report, count = _vector_evaluation(parts, scoring.dataset, meta, scoring.ref), len(samples)
    elif (
        scoring.ref is None
        and (known := scoring.dataset or read_provenance(source).get("dataset"))
        in BUILTIN_IMAGE_METRICS
    ):  # no reference statistics needed
        if not ex.is_main:
            return None
        every = images.array()
        parts = [
            (every[a:b], {"images": [a, b - 1]}) for a, b in _parts(len(every), repeats, "images")
        ]
        report = _builtin_image_report(known, parts, _sample_labels(source, len(every)))
        count = images.count
    else:
        if scoring.ref is not None or scoring.clip is None:
            reference = _reference(scoring.ref)
            detector = scoring.detector(ex.device, reference)
            parts = _split(images, repeats)
            report = evaluate_images(parts, detector, reference, scoring.batch, reporter, ex)
        count = images.count
        if scoring.clip is not None and ex.is_main:
            report = _with_clip_score(report, source, scoring, ex.device, reporter)
    if report is not None:
        report["samples"] = {
            "source": str(source.absolute()),
            "count": count,
            "provenance": _provenance(source),
        }
    return report


def _builtin_image_report(dataset: str, parts: list, labels: np.ndarray | None) -> dict:
    """Digits (FD-digits, classes) or shapes (its exact mode metric, with the drawn labels)."""
    return digits_report(parts) if dataset == "digits" else shapes_report(parts, labels)


def _one_step(generator, seeds: list[int], conditions, device) -> torch.Tensor:
    shape = generator.denoiser.data_shape
    return torch.cat(
        [x for x, _ in one_step_batches(generator, seeds, shape, conditions, 1000, device)]
    )


def _vector_dataset(samples: torch.Tensor, dataset: str | None, provenance: dict) -> str | None:
    """The ground truth of vector samples: --dataset, else their provenance's; checked against
    their shape. None only with a reference given (then mode statistics are left out)."""
    dataset = dataset or provenance.get("dataset")
    if dataset is None:
        return None
    if not isinstance(dataset, str):
        raise DisbackError("the samples' provenance names no data set; pass --dataset")
    if dataset not in DATASETS:
        raise DisbackError(
            f"no ground truth for data set {dataset!r} (known: {', '.join(DATASETS)})"
        )
    expected = get_dataset(dataset).data_shape
    if tuple(samples.shape[1:]) != tuple(expected):
        raise DisbackError(
            f"samples of shape {tuple(samples.shape[1:])} cannot be scored against {dataset} "
            f"(its samples have shape {tuple(expected)}); check --dataset"
        )
    return dataset


def _vector_evaluation(
    parts: list[tuple[torch.Tensor, dict]],
    dataset: str | None,
    provenance: dict,
    ref: Path | None,
) -> dict:
    dataset = _vector_dataset(parts[0][0], dataset, provenance)
    reference = None
    if ref is not None:
        samples, meta = read_samples(ref)
        if tuple(samples.shape[1:]) != tuple(parts[0][0].shape[1:]):
            raise DisbackError(
                f"{ref}: reference samples of shape {tuple(samples.shape[1:])}, the samples are "
                f"{tuple(parts[0][0].shape[1:])}"
            )
        reference = (samples, {"file": str(ref.absolute()), "provenance": meta})
    elif dataset is None:
        raise DisbackError("unknown ground truth for these samples; pass --dataset or --ref")
    return vector_report(parts, dataset, reference)


def _parts(count: int, repeats: int, what: str) -> list[tuple[int, int]]:
    """`repeats` disjoint, equal, consecutive ranges of `count` items."""
    size = count // repeats
    if size < 2:
        raise ConfigError(f"{count} {what} cannot be split into {repeats} repeats of 2 or more")
    return [(r * size, (r + 1) * size) for r in range(repeats)]


def _split(images: ImageSet, repeats: int) -> list[tuple[ImageSet, int, int, dict]]:
    return [
        (images, a, b, {"images": [a, b - 1]}) for a, b in _parts(images.count, repeats, "images")
    ]


def _with_clip_score(
    report: dict | None, folder: Path, scoring: Scoring, device, reporter: Reporter
) -> dict:
    """CLIP score of each part of a `sample --prompts` folder: beside the FID report's metrics
    when there is one, else as a report of its own."""
    pairs = read_prompt_listing(folder)
    scorer = ClipScorer(scoring.clip, device, scoring.clip_sha256)
    scores = clip_scores(scorer, pairs, scoring.batch, reporter)
    ranges = _parts(len(scores), scoring.repeats, "images")
    if report is None:
        results = [
            {"n": b - a, "clip_score": float(scores[a:b].mean()), "images": [a, b - 1]}
            for a, b in ranges
        ]
        return make_report(
            "image",
            "CLIP score",
            "clip_score",
            results,
            dataset=None,
            reference={"kind": "each image's prompt", "n": len(scores)},
            samples={},
            detector=scorer.describe,
        )
    for result, (a, b) in zip(report["results"], ranges, strict=True):
        result["clip_score"] = float(scores[a:b].mean())
    report["summary"] = summarize(report["results"])
    report["clip"] = scorer.describe
    return report


def _sample_labels(source: Path, count: int) -> np.ndarray | None:
    """The class each image was drawn for, as `disback sample` recorded it (dataset.json of a
    PNG folder, `labels` of an .npz), when there is one per image."""
    try:
        if source.is_dir():
            entries = parse_json(read_regular_file(source / LABELS, 1 << 30, "labels file"))
            labels = [label for _, label in entries["labels"]]
        else:
            arrays = read_npz(source)
            labels = arrays["labels"].tolist() if "labels" in arrays else None
    except (OSError, DisbackError, ValueError, KeyError, TypeError):
        return None
    if labels is None or len(labels) != count or not all(isinstance(v, int) for v in labels):
        return None
    return np.asarray(labels, dtype=np.int64)


def _provenance(source: Path) -> dict:
    """What `disback sample` recorded about the samples, seeds as [first, last] ranges."""
    provenance = read_provenance(source)
    if isinstance(provenance.get("seeds"), list):
        provenance["seeds"] = seed_ranges(provenance["seeds"])
    return provenance


def _reference(path: Path | None) -> Reference:
    if path is None:
        raise ConfigError(
            "image samples need --ref REF.npz (an EDM reference or `evaluate ref`), "
            "--dataset digits|shapes for the built-in data, or --clip CLIP_FOLDER for the CLIP "
            "score of text-to-image samples"
        )
    return load_reference(path)
