"""`disback record`: degradation recording (DisBack stage 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from disback_cli.cli._common import (
    ChannelsLastOpt,
    CheckpointingOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    PrecisionOpt,
    PromptsOpt,
    QuietOpt,
    SeedOpt,
    SetOpt,
    Tf32Opt,
    ThreadsOpt,
    VerifyOpt,
    choices,
    describe,
    emit_json,
    reporting,
    stdout,
)
from disback_cli.config import RecordConfig, build_config
from disback_cli.errors import ConfigError
from disback_cli.models.teachers import BUILTIN_PREFIX
from disback_cli.runtime.parallel import is_main_process
from disback_cli.stages.record import fit_warning, run_record


def _h(field: str) -> str:
    return describe(RecordConfig, field)


def _c(field: str) -> str:
    return choices(RecordConfig, field)


def _json(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--student-arch-kwargs is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError("--student-arch-kwargs must be a JSON object, e.g. '{\"hidden\": 32}'")
    return value


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def default_out(teacher: str) -> Path:
    name = (
        teacher[len(BUILTIN_PREFIX) :] if teacher.startswith(BUILTIN_PREFIX) else Path(teacher).stem
    )
    return Path("runs") / name


def record(
    teacher: Annotated[str | None, typer.Option("--teacher", "-t", help=_h("teacher"))] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Trajectory directory \\[default: runs/NAME]."),
    ] = None,
    iters: Annotated[int | None, typer.Option(help=_h("iters"))] = None,
    nodes: Annotated[int | None, typer.Option(help=_h("nodes"))] = None,
    batch: Annotated[int | None, typer.Option(help=_h("batch"))] = None,
    lr: Annotated[float | None, typer.Option(help=_h("lr"))] = None,
    betas: Annotated[tuple[float, float] | None, typer.Option(help=_h("betas"))] = None,
    sigma_init: Annotated[float | None, typer.Option(help=_h("sigma_init"))] = None,
    prompts: PromptsOpt = None,
    timestep: Annotated[int | None, typer.Option(help=_h("timestep"))] = None,
    lora_rank: Annotated[int | None, typer.Option(help=_h("lora_rank"))] = None,
    placement: Annotated[
        str | None, typer.Option(metavar=_c("placement"), help=_h("placement"))
    ] = None,
    student: Annotated[str | None, typer.Option(help=_h("student"))] = None,
    student_arch_kwargs: Annotated[
        str | None, typer.Option(help=_h("student_arch_kwargs") + " (JSON)")
    ] = None,
    loss: Annotated[str | None, typer.Option(metavar=_c("loss"), help=_h("loss"))] = None,
    dsm_sigma: Annotated[
        str | None, typer.Option(metavar=_c("dsm_sigma"), help=_h("dsm_sigma"))
    ] = None,
    p_mean: Annotated[float | None, typer.Option(help=_h("p_mean"))] = None,
    p_std: Annotated[float | None, typer.Option(help=_h("p_std"))] = None,
    dropout: Annotated[float | None, typer.Option(help=_h("dropout"))] = None,
    save_every: Annotated[int | None, typer.Option(help=_h("save_every"))] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    verify: VerifyOpt = None,
    precision: PrecisionOpt = None,
    tf32: Tf32Opt = None,
    compile_networks: CompileOpt = None,
    channels_last: ChannelsLastOpt = None,
    threads: ThreadsOpt = None,
    gradient_checkpointing: CheckpointingOpt = None,
    node_dtype: Annotated[
        str | None, typer.Option(metavar=_c("node_dtype"), help=_h("node_dtype"))
    ] = None,
    config: ConfigOpt = None,
    settings: SetOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Record the degradation path: fine-tune a teacher copy on samples of the frozen G0.

    Node 0 is the teacher; nodes 1..N are saved evenly over the iterations. Rerunning the same
    command resumes an interrupted recording and does nothing for a finished one.

    Example: disback record --teacher builtin:ring2d --out runs/t1 --iters 600 --nodes 6
    """
    flags = dict(
        teacher=teacher,
        iters=iters,
        nodes=nodes,
        batch=batch,
        lr=lr,
        betas=betas,
        sigma_init=sigma_init,
        prompts=prompts,
        timestep=timestep,
        lora_rank=lora_rank,
        placement=placement,
        student=student,
        student_arch_kwargs=_json(student_arch_kwargs),
        loss=loss,
        dsm_sigma=dsm_sigma,
        p_mean=p_mean,
        p_std=p_std,
        dropout=dropout,
        save_every=save_every,
        seed=seed,
        device=device,
        verify=verify,
        precision=precision,
        tf32=tf32,
        compile=compile_networks,
        channels_last=channels_last,
        threads=threads,
        gradient_checkpointing=gradient_checkpointing,
        node_dtype=node_dtype,
    )
    cfg = build_config(RecordConfig, config, "record", flags, settings)
    out = out or default_out(cfg.teacher)
    with reporting(quiet or json_out) as reporter:
        manifest = run_record(cfg, out, force=force, reporter=reporter)
    last = manifest.nodes[-1].dist_to_teacher or 1.0
    where = out.absolute()
    nodes_out = [
        {
            "index": n.index,
            "step": n.step,
            "file": str(where / n.file) if n.file else None,
            "dist_to_teacher": n.dist_to_teacher,
            "g0_loss": n.g0_loss,
            "train_loss": n.train_loss,
        }
        for n in manifest.nodes
    ]
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    warning = fit_warning(manifest.nodes)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)  # one line, however wide
    if json_out:
        emit_json(
            {
                "trajectory": str(where),
                "status": manifest.status,
                "teacher": manifest.teacher.source,
                **manifest.session,
                "elapsed_seconds": manifest.elapsed_seconds,
                "nodes": nodes_out,
                "config": manifest.config.model_dump(mode="json"),
                "config_sources": manifest.config_sources,
                "warnings": [warning] if warning else [],
            }
        )
        return
    if quiet:
        return
    table = Table(title=f"degradation path in {out}  ({manifest.elapsed_seconds:.1f} s)")
    columns = (
        "node",
        "step",
        "mean |D_node - D_teacher|",
        "share of path",
        "loss on G0",
        "training loss",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for n in manifest.nodes:
        table.add_row(
            str(n.index),
            str(n.step),
            f"{n.dist_to_teacher:.4f}",
            f"{n.dist_to_teacher / last:.0%}",
            _number(n.g0_loss),
            _number(n.train_loss),
        )
    stdout.print(table)
