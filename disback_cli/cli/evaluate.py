"""`disback evaluate`: samples against ground truth (vectors) or reference statistics (images)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

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
from disback_cli.errors import ConfigError
from disback_cli.evaluation import FID_MODES

InputsOpt = Annotated[
    list[str] | None,
    typer.Argument(help="SAMPLES (folder, .npz or dataset .zip), or: ref DATA --out REF.npz"),
]

TrajectoryOpt = Annotated[
    Path | None, typer.Option("--trajectory", "-T", help="Sample a run on the fly instead.")
]

SeedsOpt = Annotated[str | None, typer.Option(help="Seeds of the first repeat, e.g. 0-49999.")]

RepeatsOpt = Annotated[int, typer.Option(min=1, help="Disjoint seed sets / parts; min and mean.")]

RefOpt = Annotated[Path | None, typer.Option(help="Reference .npz (EDM's or `evaluate ref`).")]

OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Where `evaluate ref` writes.")]

ModeOpt = Annotated[
    str | None, typer.Option(metavar="<" + "|".join(FID_MODES) + ">", help="FID mode.")
]

AnyImagesOpt = Annotated[
    bool,
    Flag(
        "--any-images",
        help="Score every image of a folder, not only those a finished `disback sample` "
        "recorded (a data set or another tool's samples).",
    ),
]

ClipOpt = Annotated[
    Path | None,
    typer.Option(
        help="CLIP score of a `sample --prompts` folder with this local "
        "transformers CLIP model folder (beside FID with --ref)."
    ),
]

ClipSha256Opt = Annotated[
    str | None, typer.Option(help="Expected sha256 of the CLIP model's weights file.")
]

WorkersOpt = Annotated[
    int,
    typer.Option(
        min=1,
        show_default=False,
        help="Threads resizing images for the detector [default: min(4, cores)].",
    ),
]


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


def evaluate(
    inputs: InputsOpt = None,
    trajectory: TrajectoryOpt = None,
    name: Annotated[str, typer.Option(help="Backtrack run name (with --trajectory).")] = "default",
    n: Annotated[int | None, typer.Option("-n", help="Samples per repeat (seeds from 0).")] = None,
    seeds: SeedsOpt = None,
    repeats: RepeatsOpt = 1,
    ref: RefOpt = None,
    out: OutOpt = None,
    mode: ModeOpt = None,
    inception: Annotated[Path | None, typer.Option(help="Path of inception-2015-12-05.pt.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Ground truth for vector samples.")] = None,
    any_images: AnyImagesOpt = False,
    clip: ClipOpt = None,
    clip_sha256: ClipSha256Opt = None,
    batch: Annotated[int, typer.Option(min=1, help="Images per detector batch.")] = 64,
    workers: WorkersOpt = min(4, os.cpu_count() or 1),
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
    from disback_cli.runtime.parallel import execution
    from disback_cli.stages.evaluate import (
        Scoring,
        evaluate_run,
        evaluate_samples,
        reference_statistics,
        seed_sets,
    )
    from disback_cli.stages.evaluation_record import remember_evaluation

    inputs = inputs or []
    scoring = Scoring(ref, dataset, mode, inception, batch, workers, repeats, clip, clip_sha256)
    ex = execution(SampleConfig(device=device or "auto"))
    with reporting(quiet or json_out or not ex.is_main) as reporter:
        if inputs[:1] == ["ref"]:
            if len(inputs) != 2 or out is None:
                raise ConfigError("usage: disback evaluate ref DATA --out REF.npz")
            report = reference_statistics(Path(inputs[1]), out, n, scoring, ex, reporter)
        elif trajectory is not None:
            if inputs:
                raise ConfigError("give either SAMPLES or --trajectory, not both")
            sets = seed_sets(n, seeds, repeats)
            report = evaluate_run(
                trajectory, name, sets, scoring, verify is not False, ex, reporter
            )
        else:
            if len(inputs) != 1:
                raise ConfigError("give one SAMPLES path (or --trajectory, or: ref DATA --out F)")
            report = evaluate_samples(Path(inputs[0]), any_images, scoring, ex, reporter)
    if report is None:  # other ranks of a torchrun launch: rank 0 reports
        return
    if inputs[:1] != ["ref"]:
        report["recorded_in"] = remember_evaluation(report)
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
