"""`disback evaluate`: samples against ground truth (vectors) or reference statistics (images)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.table import Table

from disback_cli.cli._common import (
    DeviceOpt,
    Flag,
    JsonOpt,
    QuietOpt,
    VerifyOpt,
    emit_json,
    reporting,
    stdout,
)
from disback_cli.config import SampleConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.evaluation import detectors
from disback_cli.evaluation.clip_score import ClipScorer, clip_scores, read_prompt_listing
from disback_cli.evaluation.datasets import DATASETS, get_dataset
from disback_cli.evaluation.detectors import MODES, InceptionDetector, locate_inception
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
from disback_cli.runtime.parallel import execution
from disback_cli.store.fileio import parse_json, read_regular_file
from disback_cli.store.manifests import generator_file_of_run
from disback_cli.store.samples import LABELS, read_provenance, read_samples, seed_ranges


def _detector(
    mode: str | None, inception: Path | None, device, reference: Reference | None, workers: int
) -> InceptionDetector:
    recorded = (reference.meta.get("detector") or {}) if reference else {}
    mode = mode or recorded.get("mode") or "legacy_tensorflow"
    path = locate_inception(inception)
    return InceptionDetector(path, mode, device, detectors.INCEPTION_SHA256, workers)


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


def _cell(result: dict, key: str) -> str:
    value = result.get(key)
    if value is None:
        return "-"
    if key in ("classes_covered", "modes_covered"):
        return f"{value}/{result[key.replace('covered', 'total')]}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_report(report: dict, title: str) -> None:
    """One table for every kind: a row per sample set, then real data at the same n."""
    results = report["results"]
    keys = [
        k
        for k, v in results[0].items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k != "n"
        and not k.endswith("_total")
    ]
    detector = f" ({report['detector']['name']})" if report["detector"] else ""
    table = Table(title=f"{title}: {report['metric']}{detector} vs {_described(report)}")
    for column in ("set", "n", *keys):
        table.add_column(column, justify="right")
    for i, result in enumerate(results, start=1):
        table.add_row(str(i), str(result["n"]), *(_cell(result, k) for k in keys))
        if "at_floor_n" in result:
            first = result["at_floor_n"]
            table.add_row(
                f"{i}, first {first['n']}", str(first["n"]), *(_cell(first, k) for k in keys)
            )
    floor = report["floor"]
    if floor is not None:
        what = "held-out real" if report["kind"] in ("digits", "shapes") else "exact samples"
        table.add_row(what, str(floor["n"]), *(_cell(floor, k) for k in keys), style="dim")
    stdout.print(table)
    if report["repeats"] > 1:
        best = report["summary"][report["key"]]
        stdout.print(f"{report['metric']}: min {best['min']:.4g}, mean {best['mean']:.4g}")


def _described(report: dict) -> str:
    reference = report["reference"]
    if reference.get("file"):
        return str(reference["file"])
    return f"{reference['kind']} (n={reference['n']})"


def _split(images: ImageSet, repeats: int) -> list[tuple[ImageSet, int, int, dict]]:
    return [
        (images, a, b, {"images": [a, b - 1]}) for a, b in _parts(images.count, repeats, "images")
    ]


def evaluate(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="SAMPLES (folder, .npz or dataset .zip), or: ref DATA --out REF.npz"),
    ] = None,
    trajectory: Annotated[
        Path | None, typer.Option("--trajectory", "-T", help="Sample a run on the fly instead.")
    ] = None,
    name: Annotated[str, typer.Option(help="Backtrack run name (with --trajectory).")] = "default",
    n: Annotated[int | None, typer.Option("-n", help="Samples per repeat (seeds from 0).")] = None,
    seeds: Annotated[
        str | None, typer.Option(help="Seeds of the first repeat, e.g. 0-49999.")
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, help="Disjoint seed sets / parts; min and mean.")
    ] = 1,
    ref: Annotated[
        Path | None, typer.Option(help="Reference .npz (EDM's or `evaluate ref`).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where `evaluate ref` writes.")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(metavar="<" + "|".join(MODES) + ">", help="FID mode.")
    ] = None,
    inception: Annotated[Path | None, typer.Option(help="Path of inception-2015-12-05.pt.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Ground truth for vector samples.")] = None,
    any_images: Annotated[
        bool,
        Flag(
            "--any-images",
            help="Score every image of a folder, not only those a finished `disback sample` "
            "recorded (a data set or another tool's samples).",
        ),
    ] = False,
    clip: Annotated[
        Path | None,
        typer.Option(
            help="CLIP score of a `sample --prompts` folder with this local "
            "transformers CLIP model folder (beside FID with --ref)."
        ),
    ] = None,
    clip_sha256: Annotated[
        str | None, typer.Option(help="Expected sha256 of the CLIP model's weights file.")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per detector batch.")] = 64,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            show_default=False,
            help="Threads resizing images for the detector \\[default: min(4, cores)].",
        ),
    ] = min(4, os.cpu_count() or 1),
    device: DeviceOpt = None,
    verify: VerifyOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate samples: exact ground truth for vector data (MMD, sliced W2, modes); FID, KID and
    precision/recall (k=3) on Inception features against reference statistics for images.

    Example: disback evaluate runs/t1/samples.npz --json

    Images: disback evaluate runs/c/backtrack/default/samples --ref cifar10-32x32.npz --repeats 3;
    on the fly: disback evaluate -T runs/c -n 50000 --repeats 3 --ref cifar10-32x32.npz;
    references: disback evaluate ref cifar10-32x32.zip --out ref.npz. The default mode is
    legacy_tensorflow, which matches EDM's published numbers and reference files.
    """
    inputs = inputs or []
    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r}: no such data set (known: {', '.join(DATASETS)})")
    # Under torchrun, Inception features are extracted by all ranks (batches round-robin) and
    # scored on rank 0; the cheap vector and digits evaluations run on rank 0 alone.
    ex = execution(SampleConfig(device=device or "auto"))
    torch_device, report = ex.device, None
    with reporting(quiet or json_out or not ex.is_main) as reporter:
        if inputs[:1] == ["ref"]:
            if len(inputs) != 2 or out is None:
                raise ConfigError("usage: disback evaluate ref DATA --out REF.npz")
            images = open_images(Path(inputs[1]))
            if images is None:
                raise DisbackError(f"{inputs[1]}: reference statistics need images")
            detector = _detector(mode, inception, torch_device, None, workers)
            report = write_reference(images, detector, out, batch, n, reporter, ex)
        elif trajectory is not None:
            if inputs:
                raise ConfigError("give either SAMPLES or --trajectory, not both")
            path, sha = generator_file_of_run(trajectory, name, "ema")
            generator, info = load_generator(path, torch_device, sha, verify is not False)
            first = parse_seeds(seeds) if seeds else list(range(n or 50_000))
            if len(first) < 2:
                raise ConfigError(f"{len(first)} samples per repeat; evaluation needs at least 2")
            if (max(first) + 1) * repeats > MAX_SEED:
                raise ConfigError(f"seeds of {repeats} repeats would pass {MAX_SEED}")
            sets = [[s + r * len(first) for s in first] for r in range(repeats)]
            provenance = {"generator": str(path), "generator_sha256": sha, "step": info.get("step")}
            run = {"run": str(Path(trajectory).absolute()), "name": name, **provenance}
            denoiser = generator.denoiser
            if len(denoiser.data_shape) != 3:
                if not ex.is_main:
                    return
                conditions = condition_source(denoiser.label_dim)
                parts = [
                    (
                        torch.cat(
                            [
                                b
                                for b, _ in one_step_batches(
                                    generator,
                                    seeds_,
                                    denoiser.data_shape,
                                    conditions,
                                    1000,
                                    torch_device,
                                )
                            ]
                        ),
                        {"seeds": [seeds_[0], seeds_[-1]]},
                    )
                    for seeds_ in sets
                ]
                report = _vector_evaluation(parts, dataset, {"dataset": info.get("dataset")}, ref)
            elif ref is None and (dataset or info.get("dataset")) == "digits":
                if not ex.is_main:
                    return
                parts = [
                    (
                        np.concatenate(
                            list(
                                generated_images(
                                    generator, seeds_, batch, torch_device, "run"
                                ).batches(1000)
                            )
                        ),
                        {"seeds": [seeds_[0], seeds_[-1]]},
                    )
                    for seeds_ in sets
                ]
                report = digits_report(parts)
            else:
                reference = _reference(ref)
                parts = [
                    (
                        generated_images(generator, s, batch, torch_device, f"run {trajectory}"),
                        0,
                        len(s),
                        {"seeds": [s[0], s[-1]]},
                    )
                    for s in sets
                ]
                detector = _detector(mode, inception, torch_device, reference, workers)
                report = evaluate_images(parts, detector, reference, batch, reporter, ex)
            if report is not None:
                report["samples"] = {**run, "count": sum(len(s) for s in sets)}
        else:
            if len(inputs) != 1:
                raise ConfigError("give one SAMPLES path (or --trajectory, or: ref DATA --out F)")
            source = Path(inputs[0])
            images = open_images(source, any_images)
            if images is None:
                if not ex.is_main:
                    return
                samples, meta = read_samples(source)
                parts = [
                    (samples[a:b], {"samples": [a, b - 1]})
                    for a, b in _parts(len(samples), repeats, "samples")
                ]
                report = _vector_evaluation(parts, dataset, meta, ref)
                count = len(samples)
            elif ref is None and (known := dataset or read_provenance(source).get("dataset")) in (
                "digits",
                "shapes",
            ):  # data sets the built-in metrics know: no reference statistics needed
                if not ex.is_main:
                    return
                every = np.concatenate(list(images.batches(1000)))
                parts = [
                    (every[a:b], {"images": [a, b - 1]})
                    for a, b in _parts(len(every), repeats, "images")
                ]
                if known == "digits":
                    report = digits_report(parts)
                else:
                    report = shapes_report(parts, _sample_labels(source, len(every)))
                count = images.count
            else:
                if ref is not None or clip is None:
                    reference = _reference(ref)
                    detector = _detector(mode, inception, torch_device, reference, workers)
                    parts = _split(images, repeats)
                    report = evaluate_images(parts, detector, reference, batch, reporter, ex)
                count = images.count
                if clip is not None and ex.is_main:
                    report = _with_clip_score(
                        report, source, clip, clip_sha256, torch_device, batch, repeats, reporter
                    )
            if report is not None:
                report["samples"] = {
                    "source": str(source.absolute()),
                    "count": count,
                    "provenance": _provenance(source),
                }
    if report is None:  # other ranks of a torchrun launch: rank 0 reports
        return
    if json_out:
        emit_json(report)
    elif quiet:
        return
    elif inputs[:1] == ["ref"]:
        stdout.print(
            f"wrote {report['out']}: {report['n']} images, {report['detector']['name']} "
            f"({report['detector']['mode']})"
        )
    else:
        _print_report(report, str(inputs[0]) if inputs else f"run {trajectory}")


def _with_clip_score(
    report: dict | None,
    folder: Path,
    clip: Path,
    sha256: str | None,
    device,
    batch: int,
    repeats: int,
    reporter,
) -> dict:
    """CLIP score of each part of a `sample --prompts` folder: beside the FID report's metrics
    when there is one, else as a report of its own."""
    pairs = read_prompt_listing(folder)
    scorer = ClipScorer(clip, device, sha256)
    scores = clip_scores(scorer, pairs, batch, reporter)
    ranges = _parts(len(scores), repeats, "images")
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
            with np.load(source, allow_pickle=False) as data:
                labels = data["labels"].tolist() if "labels" in data else None
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
            "or --dataset digits for the built-in digits"
        )
    return load_reference(path)
