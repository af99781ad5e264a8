"""`disback sample`: one-step samples from a trained generator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from disback_cli.cli._common import Flag, JsonOpt, QuietOpt, emit_json, reporting, stdout
from disback_cli.cli.options import Recipe, config_command
from disback_cli.config import SampleConfig
from disback_cli.errors import one_line
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import generator_file_of_run

TrajectoryOpt = Annotated[Path, typer.Option("--trajectory", "-T", help="Trajectory directory.")]
GeneratorOpt = Annotated[
    Path | None, typer.Option(help="A generator .safetensors file instead of a run.")
]
TeacherOpt = Annotated[
    str | None, typer.Option(help="Sample a teacher with EDM's Heun sampler instead.")
]
VerifierOpt = Annotated[
    Path | None,
    typer.Option(
        help="A --loss diffratio backtrack run (RUN = TRAJECTORY/backtrack/NAME) "
        "whose density-ratio network picks one of --best-of candidates (--best-of-rule)."
    ),
]
ModelFolderOpt = Annotated[
    str | None,
    typer.Option(help="A text-to-image generator's model folder, if it moved (checked by sha256)."),
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Output .npz or PNG folder [default: RUN/samples(.npz)]."),
]
GridOpt = Annotated[
    bool,
    Flag(
        "--grid",
        help="Also write a PNG grid of the first 64 images, enlarged to at least "
        "512 pixels a side, beside the output (OUT-grid.png).",
    ),
]
GridOutOpt = Annotated[
    Path | None, typer.Option(help="Write the grid here instead (implies --grid).")
]


@config_command(SampleConfig, "sample")
def sample(
    cfg: SampleConfig,
    recipe: Recipe,
    trajectory: TrajectoryOpt = Path("."),
    name: Annotated[str, typer.Option(help="Backtrack run to sample from.")] = "default",
    generator: GeneratorOpt = None,
    teacher: TeacherOpt = None,
    steps: Annotated[int, typer.Option(min=2, help="Heun steps for --teacher.")] = 18,
    verifier: VerifierOpt = None,
    model_folder: ModelFolderOpt = None,
    out: OutOpt = None,
    grid: GridOpt = False,
    grid_out: GridOutOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Draw one-step samples, one random stream per seed (results do not depend on --batch).

    Example: disback sample --trajectory runs/t1 -n 2000 --out runs/t1/samples.npz

    Reference samples of a teacher: disback sample --teacher builtin:ring2d --steps 18 -n 2000

    Images: --format png writes EDM's layout (00000/img00000000.png, 1000 per folder, plus
    dataset.json with labels); --format npz stores uint8 images; --class K fixes the class.

    Text-to-image: --prompts FILE draws -n images per prompt (seeds 0..n-1 for every prompt),
    decoded by the teacher's VAE; prompts.json lists each image's prompt and seed.

    Without --config, a run's samples use the [sample] table of the recipe its backtrack was
    given (flags and --set override it).
    """
    from disback_cli.runtime.parallel import is_main_process
    from disback_cli.stages.sample import (
        with_trajectory_prompts,
        write_samples,
        write_teacher_samples,
    )

    with reporting(quiet or json_out) as reporter:
        if teacher is not None:
            summary = write_teacher_samples(cfg, teacher, steps, out, reporter, grid_out or grid)
        else:
            expected, default_dir = None, Path(".")
            if generator is None:
                cfg = with_recorded_recipe(recipe, cfg, trajectory, name, reporter)
                generator, expected = generator_file_of_run(trajectory, name, cfg.weights)
                default_dir = backtrack_dir(trajectory, name)
                cfg = with_trajectory_prompts(cfg, trajectory, reporter)
            grid_out = grid_out or grid
            summary = write_samples(
                cfg,
                generator,
                out,
                expected,
                reporter,
                grid_out,
                default_dir,
                model_folder,
                verifier,
            )
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    if json_out:
        emit_json({**summary, "config": cfg.model_dump(mode="json")})
    elif not quiet:
        grid = f"; the grid is {summary['grid']}" if "grid" in summary else ""
        stdout.print(
            f"wrote {summary['n']} samples to {summary['out']} "
            f"({summary['samples_per_second']:.0f} samples/s){grid}"
        )


def with_recorded_recipe(
    recipe: Recipe, cfg: SampleConfig, trajectory: Path, name: str, reporter: Reporter
) -> SampleConfig:
    """Without --config, the run's config over the [sample] table its backtrack recorded (see
    `stages.sample.with_run_recipe`), said in one note, since no flag shows where it came from."""
    from disback_cli.stages.sample import with_run_recipe

    if recipe.path is not None:
        return cfg
    cfg, recorded = with_run_recipe(recipe.over, cfg, trajectory, name)
    if recorded is not None:
        reporter.note(
            escape(
                one_line(
                    f"sample settings: [sample] of {recorded}, recorded by backtrack "
                    "(--config chooses another recipe)"
                )
            )
        )
    return cfg
