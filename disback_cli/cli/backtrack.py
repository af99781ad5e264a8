"""`disback backtrack`: distribution backtracking (DisBack stage 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from disback_cli.cli._common import ForceOpt, JsonOpt, QuietOpt, emit_json, reporting, stdout
from disback_cli.cli.options import Recipe, config_command
from disback_cli.config import BacktrackConfig, SampleConfig
from disback_cli.config.recipes import recipe_table
from disback_cli.errors import ConfigError, describe_validation_error
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import SampleRecipe
from disback_cli.store.metrics_log import read_metrics


@config_command(BacktrackConfig, "backtrack")
def backtrack(
    cfg: BacktrackConfig,
    recipe: Recipe,
    trajectory: Annotated[
        Path, typer.Option("--trajectory", "-T", help="Trajectory directory from `disback record`.")
    ] = Path("."),
    name: Annotated[str, typer.Option(help="Run name: writes backtrack/NAME/.")] = "default",
    teacher: Annotated[
        str | None, typer.Option(help="Teacher location if it moved (checked by sha256).")
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a one-step generator along the recorded path, from node N back to the teacher.

    The fake score starts at node N; the target starts at node N-1 and moves one node toward the
    teacher every --interval iterations. --no-trajectory runs the plain distillation baseline
    (target = teacher, fake = teacher) through the same loop. Rerunning resumes; a larger
    --iters extends a finished run.

    Example: disback backtrack --trajectory runs/t1 --iters 1500 --interval 100 --seed 0
    """
    from disback_cli.runtime.parallel import is_main_process
    from disback_cli.stages.backtrack import run_backtrack

    sample_recipe = recorded_sample_recipe(recipe.path)
    with reporting(quiet or json_out) as reporter:
        manifest = run_backtrack(
            cfg,
            trajectory,
            name,
            force=force,
            teacher_override=teacher,
            reporter=reporter,
            sample_recipe=sample_recipe,
        )
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    run_dir = backtrack_dir(trajectory, name).absolute()
    lines = read_metrics(run_dir)
    summary = {
        "run": str(run_dir),
        "trajectory": str(Path(trajectory).absolute()),
        "name": name,
        "status": manifest.status,
        "step": manifest.step,
        **manifest.session,
        "elapsed_seconds": manifest.elapsed_seconds,
        "generator": str(run_dir / manifest.generator.file) if manifest.generator else None,
        "generator_ema": str(run_dir / manifest.generator_ema.file)
        if manifest.generator_ema
        else None,
        "metrics": str(run_dir / manifest.metrics),
        "last_metrics": lines[-1] if lines else {},
        "config": manifest.config.model_dump(mode="json"),
        "config_sources": manifest.config_sources,
    }
    if json_out:
        emit_json(summary)
    elif not quiet:
        measured = next((ln["eval"] for ln in reversed(lines) if "eval" in ln), {})
        metrics = "; " + ", ".join(f"{k} {v:.4g}" for k, v in measured.items()) if measured else ""
        stdout.print(
            f"{run_dir}: {manifest.status} at iteration {manifest.step} "
            f"({manifest.elapsed_seconds:.1f} s); generator: {summary['generator_ema']}{metrics}"
        )


def recorded_sample_recipe(path: Path | None) -> SampleRecipe | None:
    """The recipe's `[sample]` table, checked now, for the run to remember: `sample -T` then
    draws with it without being given the recipe again."""
    found = recipe_table(SampleConfig, path, "sample") if path is not None else None
    if found is None:
        return None
    table, sha256 = found
    try:
        return SampleRecipe(file=str(path), sha256=sha256, table=table)
    except ValidationError as exc:
        raise ConfigError(f"{path} [sample]: {describe_validation_error(exc)}") from None
