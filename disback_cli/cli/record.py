"""`disback record`: degradation recording (DisBack stage 1)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from disback_cli.cli._common import ForceOpt, JsonOpt, QuietOpt, emit_json, reporting, stdout
from disback_cli.cli.options import config_command
from disback_cli.config import RecordConfig
from disback_cli.config.teacher_kinds import BUILTIN_PREFIX


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fit(node, teacher_loss: float | None) -> float | None:
    """A node's denoising loss on G0 relative to the teacher's: below 1, it fits G0 better
    (`fit_warning` wants node N at 0.95 or less)."""
    if node.g0_loss is None or not teacher_loss:
        return None
    return node.g0_loss / teacher_loss


def default_out(teacher: str) -> Path:
    name = (
        teacher[len(BUILTIN_PREFIX) :] if teacher.startswith(BUILTIN_PREFIX) else Path(teacher).stem
    )
    return Path("runs") / name


@config_command(RecordConfig, "record")
def record(
    cfg: RecordConfig,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Trajectory directory [default: runs/NAME]."),
    ] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Record the degradation path: fine-tune a teacher copy on samples of the frozen G0.

    Node 0 is the teacher; nodes 1..N are saved evenly over the iterations. Rerunning the same
    command resumes an interrupted recording and does nothing for a finished one.

    Example: disback record --teacher builtin:ring2d --out runs/t1 --iters 600 --nodes 6
    """
    from disback_cli.runtime.parallel import is_main_process
    from disback_cli.stages.record import fit_warning, run_record

    out = out or default_out(cfg.teacher)
    with reporting(quiet or json_out) as reporter:
        manifest = run_record(cfg, out, force=force, reporter=reporter)
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    warning = fit_warning(manifest.nodes)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)  # one line, however wide
    warnings = manifest.session.get("warnings", []) + ([warning] if warning else [])
    if json_out:
        emit_json(
            {
                "trajectory": str(out.absolute()),
                "status": manifest.status,
                "teacher": manifest.teacher.source,
                **manifest.session,
                "elapsed_seconds": manifest.elapsed_seconds,
                "nodes": _nodes_json(manifest, out.absolute()),
                "config": manifest.config.model_dump(mode="json"),
                "config_sources": manifest.config_sources,
                "warnings": warnings,
            }
        )
    elif not quiet:
        stdout.print(_nodes_table(manifest, out))


def _nodes_json(manifest, where: Path) -> list[dict]:
    teacher_loss = manifest.nodes[0].g0_loss
    return [
        {
            "index": n.index,
            "step": n.step,
            "file": str(where / n.file) if n.file else None,
            "dist_to_teacher": n.dist_to_teacher,
            "g0_loss": n.g0_loss,
            "g0_loss_vs_teacher": _fit(n, teacher_loss),
            "train_loss": n.train_loss,
        }
        for n in manifest.nodes
    ]


def _nodes_table(manifest, out: Path) -> Table:
    last = manifest.nodes[-1].dist_to_teacher or 1.0
    teacher_loss = manifest.nodes[0].g0_loss
    table = Table(title=f"degradation path in {out}  ({manifest.elapsed_seconds:.1f} s)")
    columns = (
        "node",
        "step",
        "mean |D_node - D_teacher|",
        "share of path",
        "loss on G0",
        "vs teacher",
        "training loss",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for n in manifest.nodes:
        fit = _fit(n, teacher_loss)
        table.add_row(
            str(n.index),
            str(n.step),
            f"{n.dist_to_teacher:.4f}",
            f"{n.dist_to_teacher / last:.0%}",
            _number(n.g0_loss),
            "-" if fit is None else f"{fit:.3f}",
            _number(n.train_loss),
        )
    return table
