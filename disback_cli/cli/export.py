"""`disback export`: a finished run's generator for use outside disback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disback_cli.cli._common import Flag, JsonOpt, QuietOpt, emit_json, reporting, stdout
from disback_cli.cli.options import config_command
from disback_cli.config.export import ExportConfig

TrajectoryOpt = Annotated[Path, typer.Option("--trajectory", "-T", help="Trajectory directory.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="The export folder (new or empty).")]
ModelFolderOpt = Annotated[
    str | None,
    typer.Option(help="A text-to-image teacher's model folder, if it moved (checked by sha256)."),
]
ForceOpt = Annotated[
    bool,
    Flag(
        "--force",
        help="Export into a folder that is not empty: replaces the files an earlier export wrote "
        "there and nothing else.",
    ),
]


@config_command(ExportConfig, "export")
def export(
    cfg: ExportConfig,
    trajectory: TrajectoryOpt = Path("."),
    name: Annotated[str, typer.Option(help="Backtrack run to export.")] = "default",
    out: OutOpt = Path("export"),
    force: ForceOpt = False,
    model_folder: ModelFolderOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a finished backtrack run's generator where other tools load it, with a model card
    (README.md: teacher, path, run, the last evaluation of these weights, how to use it).

    Example: disback export -T runs/t1 --format safetensors --out exports/t1

    Text-to-image: --format diffusers --pipeline writes a folder that
    diffusers.DiffusionPipeline.from_pretrained opens (one step, guidance 0); without
    --pipeline, the UNet alone. EDM-style generators: --format onnx writes x = G(z, labels).
    """
    from disback_cli.stages.export import export_run

    with reporting(quiet or json_out) as reporter:
        summary = export_run(cfg, trajectory, name, out, force, reporter, model_folder)
    if json_out:
        emit_json({**summary, "config": cfg.model_dump(mode="json")})
    elif not quiet:
        size = summary["bytes"] / (1 << 20)
        stdout.print(
            f"wrote {len(summary['files'])} files ({size:.1f} MiB) to {summary['out']} "
            f"in {summary['seconds']:.1f} s; the model card is {summary['out']}/README.md"
        )
