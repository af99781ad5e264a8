"""`disback backtrack`: distribution backtracking (DisBack stage 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disback_cli.cli._common import (
    ChannelsLastOpt,
    CheckpointingOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    Flag,
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
from disback_cli.config import BacktrackConfig, build_config
from disback_cli.runtime.parallel import is_main_process
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.metrics_log import read_metrics


def _h(field: str) -> str:
    return describe(BacktrackConfig, field)


def _c(field: str) -> str:
    return choices(BacktrackConfig, field)


def backtrack(
    trajectory: Annotated[
        Path, typer.Option("--trajectory", "-T", help="Trajectory directory from `disback record`.")
    ] = Path("."),
    name: Annotated[str, typer.Option(help="Run name: writes backtrack/NAME/.")] = "default",
    iters: Annotated[int | None, typer.Option(help=_h("iters"))] = None,
    interval: Annotated[int | None, typer.Option(help=_h("interval"))] = None,
    no_trajectory: Annotated[bool | None, Flag("--no-trajectory", help=_h("no_trajectory"))] = None,
    loss: Annotated[str | None, typer.Option(metavar=_c("loss"), help=_h("loss"))] = None,
    sid_alpha: Annotated[float | None, typer.Option(help=_h("sid_alpha"))] = None,
    data: Annotated[str | None, typer.Option(help=_h("data"))] = None,
    ratio_width: Annotated[int | None, typer.Option(help=_h("ratio_width"))] = None,
    ratio_depth: Annotated[int | None, typer.Option(help=_h("ratio_depth"))] = None,
    prompts: PromptsOpt = None,
    guidance_scale: Annotated[float | None, typer.Option(help=_h("guidance_scale"))] = None,
    dsm_sigma: Annotated[
        str | None, typer.Option(metavar=_c("dsm_sigma"), help=_h("dsm_sigma"))
    ] = None,
    switch: Annotated[str | None, typer.Option(metavar=_c("switch"), help=_h("switch"))] = None,
    switch_patience: Annotated[int | None, typer.Option(help=_h("switch_patience"))] = None,
    switch_tolerance: Annotated[float | None, typer.Option(help=_h("switch_tolerance"))] = None,
    batch: Annotated[int | None, typer.Option(help=_h("batch"))] = None,
    lr_g: Annotated[float | None, typer.Option(help=_h("lr_g"))] = None,
    lr_fake: Annotated[float | None, typer.Option(help=_h("lr_fake"))] = None,
    optimizer: Annotated[
        str | None, typer.Option(metavar=_c("optimizer"), help=_h("optimizer"))
    ] = None,
    betas: Annotated[tuple[float, float] | None, typer.Option(help=_h("betas"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=_h("weight_decay"))] = None,
    fake_steps: Annotated[int | None, typer.Option(help=_h("fake_steps"))] = None,
    ema_halflife_kimg: Annotated[float | None, typer.Option(help=_h("ema_halflife_kimg"))] = None,
    grad_clip: Annotated[float | None, typer.Option(help=_h("grad_clip"))] = None,
    p_mean: Annotated[float | None, typer.Option(help=_h("p_mean"))] = None,
    p_std: Annotated[float | None, typer.Option(help=_h("p_std"))] = None,
    dropout: Annotated[float | None, typer.Option(help=_h("dropout"))] = None,
    save_every: Annotated[int | None, typer.Option(help=_h("save_every"))] = None,
    log_every: Annotated[int | None, typer.Option(help=_h("log_every"))] = None,
    eval_every: Annotated[int | None, typer.Option(help=_h("eval_every"))] = None,
    mismatch_every: Annotated[int | None, typer.Option(help=_h("mismatch_every"))] = None,
    log_to: Annotated[
        list[str] | None,
        typer.Option(metavar="<tensorboard|wandb>", help=_h("log_to") + " (repeatable)"),
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Teacher location if it moved (checked by sha256).")
    ] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    verify: VerifyOpt = None,
    precision: PrecisionOpt = None,
    tf32: Tf32Opt = None,
    compile_networks: CompileOpt = None,
    channels_last: ChannelsLastOpt = None,
    threads: ThreadsOpt = None,
    gradient_checkpointing: CheckpointingOpt = None,
    config: ConfigOpt = None,
    settings: SetOpt = None,
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
    flags = dict(
        iters=iters,
        interval=interval,
        no_trajectory=no_trajectory,
        loss=loss,
        sid_alpha=sid_alpha,
        dsm_sigma=dsm_sigma,
        switch=switch,
        switch_patience=switch_patience,
        switch_tolerance=switch_tolerance,
        batch=batch,
        lr_g=lr_g,
        lr_fake=lr_fake,
        optimizer=optimizer,
        betas=betas,
        weight_decay=weight_decay,
        fake_steps=fake_steps,
        ema_halflife_kimg=ema_halflife_kimg,
        grad_clip=grad_clip,
        p_mean=p_mean,
        p_std=p_std,
        dropout=dropout,
        save_every=save_every,
        log_every=log_every,
        eval_every=eval_every,
        mismatch_every=mismatch_every,
        log_to=log_to,
        seed=seed,
        device=device,
        verify=verify,
        precision=precision,
        tf32=tf32,
        compile=compile_networks,
        channels_last=channels_last,
        threads=threads,
        prompts=prompts,
        data=data,
        ratio_width=ratio_width,
        ratio_depth=ratio_depth,
        guidance_scale=guidance_scale,
        gradient_checkpointing=gradient_checkpointing,
    )
    cfg = build_config(BacktrackConfig, config, "backtrack", flags, settings)
    with reporting(quiet or json_out) as reporter:
        manifest = run_backtrack(
            cfg, trajectory, name, force=force, teacher_override=teacher, reporter=reporter
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
        stdout.print(
            f"{run_dir}: {manifest.status} at iteration {manifest.step} "
            f"({manifest.elapsed_seconds:.1f} s); generator: {summary['generator_ema']}"
        )
