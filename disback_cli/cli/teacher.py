"""`disback teacher ...`: built-in teachers and training them from a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disback_cli.cli._common import JsonOpt, QuietOpt, emit_json, reporting, stdout
from disback_cli.cli.options import config_command
from disback_cli.config.teacher_kinds import BUILTIN_PREFIX, BUILTIN_TEACHERS
from disback_cli.config.teacher_train import TeacherTrainConfig

app = typer.Typer(help="Teachers: inspect, convert EDM pickles, list built-ins, train one.")

TeacherArg = Annotated[
    str,
    typer.Argument(
        help="builtin:NAME, a .safetensors teacher, an EDM .pkl or a diffusers model folder."
    ),
]


@app.command("inspect")
def inspect(teacher: TeacherArg, json_out: JsonOpt = False) -> None:
    """Describe a teacher: architecture, preconditioning, shape, classes, parameters, sha256.

    EDM pickles are read without running any code from them.

    Example: disback teacher inspect edm-cifar10-32x32-uncond-vp.pkl --json
    """
    from disback_cli.models.teachers import describe_teacher, open_teacher

    report = describe_teacher(open_teacher(teacher))
    if json_out:
        emit_json(report)
        return
    for key, value in report.items():
        if value is not None:
            stdout.print(f"{key:16s} {value}")


@app.command("convert")
def convert(
    teacher: TeacherArg,
    out: Annotated[Path, typer.Argument(help="Teacher file to write (.safetensors).")],
    json_out: JsonOpt = False,
) -> None:
    """Convert a teacher (e.g. an EDM pickle) into a disback teacher file: safetensors weights with
    the network spec in the metadata, so later stages need no pickle.

    Example: disback teacher convert edm-cifar10-32x32-uncond-vp.pkl cifar10-vp.safetensors
    """
    from disback_cli.models.denoiser_files import save_denoiser
    from disback_cli.models.teachers import open_teacher

    loaded = open_teacher(teacher)
    info = {
        **loaded.info,
        "role": "teacher",
        "converted_from": Path(teacher).name,
        "source_sha256": loaded.sha256,
        "dataset": loaded.dataset,
        "train_sigma": loaded.train_sigma,
    }
    digest = save_denoiser(out, loaded.denoiser, loaded.spec, info)
    if json_out:
        emit_json({"out": str(out), "sha256": digest, "source_sha256": loaded.sha256})
    else:
        stdout.print(f"wrote {out} (sha256 {digest})")


@app.command("list")
def list_teachers(json_out: JsonOpt = False) -> None:
    """List the built-in teachers (usable as --teacher builtin:NAME)."""
    if json_out:
        emit_json({BUILTIN_PREFIX + k: v for k, v in BUILTIN_TEACHERS.items()})
        return
    for name, text in BUILTIN_TEACHERS.items():
        stdout.print(f"{BUILTIN_PREFIX}{name}  {text}")


@app.command("train")
@config_command(TeacherTrainConfig, "teacher_train")
def train(
    cfg: TeacherTrainConfig,
    out: Annotated[Path, typer.Option("--out", "-o", help="Teacher file to write (.safetensors).")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a teacher denoiser on an exact built-in data set.

    Example: disback teacher train --config recipes/teacher-ring2d.toml --out ring2d.safetensors
    """
    from disback_cli.stages.train_teacher import train_teacher

    with reporting(quiet or json_out) as reporter:
        digest = train_teacher(cfg, out, reporter)
    if json_out:
        emit_json({"out": str(out), "sha256": digest, "config": cfg.model_dump(mode="json")})
    elif not quiet:
        stdout.print(f"wrote {out} (sha256 {digest})")
