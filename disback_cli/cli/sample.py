"""`disback sample`: one-step samples from a trained generator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disback_cli.cli._common import (
    ChannelsLastOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    Flag,
    JsonOpt,
    PrecisionOpt,
    QuietOpt,
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
from disback_cli.config import SampleConfig, build_config
from disback_cli.errors import ConfigError
from disback_cli.method.guidance import guided
from disback_cli.method.sampling import HeunSampler
from disback_cli.models.teachers import open_teacher
from disback_cli.models.text_to_image.text import TextEncoder
from disback_cli.models.text_to_image.vae import LatentDecoder
from disback_cli.runtime.parallel import execution, is_main_process
from disback_cli.stages.sample import write_samples, write_samples_of
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import generator_file_of_run


def _h(field: str) -> str:
    return describe(SampleConfig, field)


def sample(
    trajectory: Annotated[
        Path, typer.Option("--trajectory", "-T", help="Trajectory directory.")
    ] = Path("."),
    name: Annotated[str, typer.Option(help="Backtrack run to sample from.")] = "default",
    generator: Annotated[
        Path | None, typer.Option(help="A generator .safetensors file instead of a run.")
    ] = None,
    teacher: Annotated[
        str | None, typer.Option(help="Sample a teacher with EDM's Heun sampler instead.")
    ] = None,
    steps: Annotated[int, typer.Option(min=2, help="Heun steps for --teacher.")] = 18,
    prompts: Annotated[str | None, typer.Option(help=_h("prompts"))] = None,
    guidance_scale: Annotated[
        float,
        typer.Option(min=0, max=100, help="Classifier-free guidance of a text-to-image --teacher."),
    ] = 1.0,
    best_of: Annotated[int | None, typer.Option(help=_h("best_of"))] = None,
    verifier: Annotated[
        Path | None,
        typer.Option(
            help="A --loss diffratio backtrack run (RUN = TRAJECTORY/backtrack/NAME) "
            "whose density-ratio network picks the best of --best-of candidates."
        ),
    ] = None,
    model_folder: Annotated[
        str | None,
        typer.Option(
            help="A text-to-image generator's model folder, if it moved (checked by sha256)."
        ),
    ] = None,
    n: Annotated[
        int | None,
        typer.Option(
            "-n", help="Number of samples, seeds 0..n-1 \\[default: 1000 unless --seeds]."
        ),
    ] = None,
    seeds: Annotated[str | None, typer.Option(help=_h("seeds"))] = None,
    batch: Annotated[int | None, typer.Option(help=_h("batch"))] = None,
    weights: Annotated[
        str | None, typer.Option(metavar=choices(SampleConfig, "weights"), help=_h("weights"))
    ] = None,
    format: Annotated[
        str | None,
        typer.Option("--format", metavar=choices(SampleConfig, "format"), help=_h("format")),
    ] = None,
    class_label: Annotated[int | None, typer.Option("--class", help=_h("class_label"))] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output .npz or PNG folder \\[default: RUN/samples(.npz)]."
        ),
    ] = None,
    grid: Annotated[
        bool,
        Flag(
            "--grid",
            help="Also write a PNG grid of the first 64 images, enlarged to at least "
            "512 pixels a side, beside the output (OUT-grid.png).",
        ),
    ] = False,
    grid_out: Annotated[
        Path | None, typer.Option(help="Write the grid here instead (implies --grid).")
    ] = None,
    device: DeviceOpt = None,
    verify: VerifyOpt = None,
    precision: PrecisionOpt = None,
    tf32: Tf32Opt = None,
    compile_networks: CompileOpt = None,
    channels_last: ChannelsLastOpt = None,
    threads: ThreadsOpt = None,
    config: ConfigOpt = None,
    settings: SetOpt = None,
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
    """
    flags = dict(
        n=n,
        seeds=seeds,
        batch=batch,
        weights=weights,
        format=format,
        prompts=prompts,
        best_of=best_of,
        class_label=class_label,
        device=device,
        verify=verify,
        precision=precision,
        tf32=tf32,
        compile=compile_networks,
        channels_last=channels_last,
        threads=threads,
    )
    cfg = build_config(SampleConfig, config, "sample", flags, settings)
    with reporting(quiet or json_out) as reporter:
        if teacher is not None:
            device = execution(cfg).device
            loaded = open_teacher(teacher, device)
            info = {
                "file": teacher,
                "sha256": loaded.sha256,
                "weights": f"heun-{steps}",
                "dataset": loaded.dataset,
                "teacher_sha256": loaded.sha256,
            }
            text = None
            if loaded.text_to_image:
                text = (TextEncoder(loaded.folder, device), LatentDecoder(loaded.folder, device))
                info["weights"] += f"-guidance-{guidance_scale:g}"
            elif guidance_scale != 1:
                raise ConfigError("--guidance-scale is for text-to-image teachers")
            sampler = HeunSampler(guided(loaded.denoiser, guidance_scale), steps)
            summary = write_samples_of(
                sampler, info, cfg, out, reporter, grid_out or grid, text=text
            )
        else:
            expected, default_dir = None, Path(".")
            if generator is None:
                generator, expected = generator_file_of_run(trajectory, name, cfg.weights)
                default_dir = backtrack_dir(trajectory, name)
            summary = write_samples(
                cfg,
                generator,
                out,
                expected,
                reporter,
                grid_out or grid,
                default_dir,
                model_folder,
                verifier,
            )
    if not is_main_process():  # under torchrun, rank 0 reports
        return
    if json_out:
        emit_json({**summary, "config": cfg.model_dump(mode="json")})
    elif not quiet:
        stdout.print(
            f"wrote {summary['n']} samples to {summary['out']} "
            f"({summary['samples_per_second']:.0f} samples/s)"
        )
