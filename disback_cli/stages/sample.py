"""One-step sampling from a trained generator (or a teacher's Heun sampler) into an .npz file or
an EDM-layout PNG folder.

What to draw is the generator and its family's `SampleConditions` (which images, their
conditions, how the output is decoded), optionally with a verifier that picks one of K
candidates per seed; where it goes is a writer from `store.sample_writers`. Under torchrun,
batches go round-robin to the ranks; each rank writes its own PNGs and sends arrays (npz),
labels and grid images to rank 0, so the files equal a one-process run's byte for byte.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from disback_cli import __version__
from disback_cli.config import SampleConfig
from disback_cli.config.resolve import refuse_foreign_options
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.evaluation.plot import scatter_png
from disback_cli.method.generator import load_generator
from disback_cli.method.sampling import HeunSampler, best_of_k, parse_seeds, seeded_noise
from disback_cli.models.family import SampleConditions
from disback_cli.models.ratio import load_ratio
from disback_cli.models.teachers import TEACHER_FAMILIES, generator_family, open_teacher
from disback_cli.runtime.devices import check_fits_memory
from disback_cli.runtime.parallel import Execution, execution, process_of
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.fileio import atomic_write_bytes, hash_regular_file
from disback_cli.store.images import encode_png, prompt_grid, to_uint8
from disback_cli.store.layout import MANIFEST, backtrack_dir
from disback_cli.store.manifests import (
    MAX_PROMPT_FILE_BYTES,
    TrajectoryManifest,
    read_manifest,
    read_run,
    verifier_of_run,
)
from disback_cli.store.sample_writers import NpzFile, PngFolder
from disback_cli.store.samples import MAX_SAMPLES

GRID_IMAGES = 64


def sample_seeds(cfg: SampleConfig) -> list[int]:
    if cfg.seeds is not None and cfg.n is not None:
        raise ConfigError("give either -n or --seeds, not both")
    if cfg.seeds is not None:
        return parse_seeds(cfg.seeds)
    return list(range(cfg.n if cfg.n is not None else 1000))


def with_trajectory_prompts(
    cfg: SampleConfig, trajectory: Path, reporter: Reporter
) -> SampleConfig:
    """A run's samples without --prompts are drawn for the prompts its trajectory was recorded
    with, if that file is unchanged (sha256)."""
    if cfg.prompts is not None:
        return cfg
    recorded = read_manifest(Path(trajectory), TrajectoryManifest).prompts
    if recorded is None:
        return cfg
    if hash_regular_file(recorded.file, MAX_PROMPT_FILE_BYTES, "prompt file") != recorded.sha256:
        raise DisbackError(
            f"{recorded.file}: the trajectory's prompt file changed since it was recorded; "
            "pass --prompts FILE"
        )
    reporter.note(f"prompts: {recorded.file} (the trajectory's; --prompts FILE for others)")
    return cfg.model_copy(update={"prompts": recorded.file})


def with_run_recipe(
    rebuild: Callable[[str, dict[str, Any]], SampleConfig],
    cfg: SampleConfig,
    trajectory: Path,
    name: str,
) -> tuple[SampleConfig, str | None]:
    """A run's samples drawn without --config take the [sample] table of the recipe its backtrack
    was given (`rebuild(where, table)`: flags and --set still win), so that table is not silently
    dropped when the recipe is not given again; also the recipe's file as given (None: the run
    recorded no table). The table comes from a file anyone may edit: it is validated as a
    recipe's table is."""
    recorded = read_run(trajectory, name).sample_recipe
    if recorded is None:
        return cfg, None
    where = f"{backtrack_dir(trajectory, name) / MANIFEST} sample_recipe"
    return rebuild(where, recorded.table), recorded.file


def write_samples(
    cfg: SampleConfig,
    generator_path: Path,
    out: Path | None = None,
    expected_sha256: str | None = None,
    reporter: Reporter | None = None,
    grid_out: Path | bool = False,
    default_dir: Path = Path("."),
    model_folder: str | None = None,
    verifier_run: Path | None = None,
) -> dict:
    """Sample a generator file one step per seed (see `write_samples_of`), conditioned and
    decoded as its family says (a text-to-image generator with the text encoders and VAE its
    file names, from `model_folder` if moved); with `verifier_run` (a diffratio run) one of
    `cfg.best_of` candidates per seed, chosen by its ratio network."""
    device = execution(cfg).device
    generator, info = load_generator(generator_path, device, expected_sha256, cfg.verify)
    family = generator_family(info, device, cfg.verify, model_folder)
    conditions = family.sample_conditions(generator.denoiser, cfg, device)
    verifier = None
    if verifier_run is not None:
        path, sha = verifier_of_run(verifier_run)
        ratio, _ = load_ratio(path, device, sha, cfg.verify)
        denoiser = generator.denoiser
        if (ratio.spec.data_shape, ratio.spec.label_dim) != (
            tuple(denoiser.data_shape),
            denoiser.label_dim,
        ):
            raise DisbackError(
                f"{path}: the verifier's data or classes differ from the generator's"
            )
        verifier = (ratio, {"verifier": str(path.absolute()), "verifier_sha256": sha})
    return write_samples_of(
        generator, info, cfg, conditions, out, reporter, grid_out, default_dir, verifier
    )


def write_teacher_samples(
    cfg: SampleConfig,
    source: str,
    steps: int,
    out: Path | None = None,
    reporter: Reporter | None = None,
    grid_out: Path | bool = False,
) -> dict:
    """Reference samples of a teacher by EDM's Heun sampler, its target guided as backtracking
    guides it (text-to-image teachers; the family's default scale unless `cfg.guidance_scale`)."""
    device = execution(cfg).device
    teacher = open_teacher(source, device)
    family = teacher.family
    info = {
        "file": source,
        "sha256": teacher.sha256,
        "weights": f"heun-{steps}",
        "dataset": teacher.dataset,
        "teacher_sha256": teacher.sha256,
    }
    refuse_foreign_options(cfg, TEACHER_FAMILIES, [family])
    scale = cfg.guidance_scale
    if "guidance_scale" in family.options:  # a family whose targets are guided
        scale = family.default_guidance() if scale is None else scale
        info["weights"] += f"-guidance-{scale:g}"
    sampler = HeunSampler(family.target(teacher.denoiser, scale), steps)
    conditions = family.sample_conditions(teacher.denoiser, cfg, device)
    return write_samples_of(sampler, info, cfg, conditions, out, reporter, grid_out)


def write_samples_of(
    generator: nn.Module,
    info: dict,
    cfg: SampleConfig,
    conditions: SampleConditions,
    out: Path | None = None,
    reporter: Reporter | None = None,
    grid_out: Path | bool = False,
    default_dir: Path = Path("."),
    verifier: tuple[torch.nn.Module, dict] | None = None,
) -> dict:
    """Sample per seed (the items `conditions` makes of the seeds) and write the samples with
    their seeds, labels, prompts and provenance (`info`).

    Vectors go to an .npz (`samples` float32). Images become uint8 (x * 127.5 + 128) and go to a
    PNG folder in EDM's layout with `dataset.json` and a completion record `provenance.json`
    (see `samplefolder`), or to an .npz (`images` N,H,W,C uint8). Sizes whose arrays cannot fit
    in memory are refused before anything is written. With a `verifier` (a DiffRatio ratio
    network and what identifies it) each seed's sample is one of `cfg.best_of` candidates, chosen
    by `cfg.best_of_rule`.
    """
    ex, reporter = process_of(cfg, reporter)
    seeds = sample_seeds(cfg)
    generator = generator.to(ex.device)
    items = conditions.items(seeds)
    if len(items) > MAX_SAMPLES:
        raise ConfigError(f"{len(items)} images in one call, more than {MAX_SAMPLES}")
    shape = conditions.output_shape(generator.denoiser.data_shape)
    is_image = len(shape) == 3
    fmt = ("png" if is_image else "npz") if cfg.format == "auto" else cfg.format
    if fmt == "png" and not is_image:
        raise ConfigError("--format png needs an image generator; use npz for vector data")
    if grid_out and not (is_image or tuple(shape) == (2,)):
        raise ConfigError("--grid needs an image generator or 2-D samples (a scatter plot)")
    out = out or default_dir / ("samples" if fmt == "png" else "samples.npz")
    grid_path = None  # grid_out: a path, or True for OUT-grid.png beside the output
    if grid_out:
        grid_path = (
            grid_out if isinstance(grid_out, Path) else out.with_name(f"{out.stem}-grid.png")
        )
    _check_sizes(cfg, ex, shape, len(items), fmt, is_image)
    meta = _provenance(info, conditions, seeds, cfg, verifier)
    names = [name for name, _, _ in items]
    writer = PngFolder(out, names, meta) if fmt == "png" else NpzFile(out, names, meta, is_image)
    with writer.lock(ex.is_main, reporter.note):  # one `sample` at a time writes a folder
        draw = (generator, conditions, verifier)
        return _write(draw, cfg, ex, reporter, seeds, items, writer, grid_path, fmt)


def _write(draw, cfg, ex: Execution, reporter, seeds, items, writer, grid_path, fmt) -> dict:
    """Draw and write every sample (see `write_samples_of`); rank 0 finishes the output."""
    generator, conditions, _ = draw
    writer.check()
    ex.barrier()
    if ex.is_main:
        removed = writer.start()
        if removed:
            reporter.note(f"{writer.out}: replaced {removed} images of an earlier `disback sample`")
    ex.barrier()
    ex.prepare(generator.denoiser)
    started = time.perf_counter()
    mine = _draw_and_write(draw, cfg, ex, reporter, items, writer, grid_path)
    writer.flush()
    gathered = ex.gather_to_main(mine)
    seconds = time.perf_counter() - started  # generating and writing, all ranks together
    summary = {
        "out": str(writer.out.absolute()),
        "format": fmt,
        "n": len(items),
        "seconds": seconds,
        "samples_per_second": len(items) / seconds,
    }
    if gathered is None:  # other ranks: rank 0 writes the rest
        return summary
    parts = [part for rank_parts in gathered for part in rank_parts.items()]
    ordered = [value for _, value in sorted(parts, key=lambda item: item[0])]
    labels = [lab for _, lab, _ in ordered if lab is not None]
    all_labels = np.concatenate(labels).astype(np.int64) if labels else None
    summary.update(writer.meta)
    arrays = [a for a, _, _ in ordered if a is not None]
    prompts = conditions.prompts_of(items)
    summary.update(writer.finish(seeds, all_labels, items, prompts, arrays))
    if grid_path is not None and arrays and arrays[0].ndim == 2:  # 2-D vectors: a scatter
        points = np.concatenate(arrays)
        atomic_write_bytes(grid_path, scatter_png(points, f"{len(points)} samples"))
        summary["grid"] = str(grid_path.absolute())
    elif grid_path is not None:
        grid_chunks = [g for _, _, g in ordered if g is not None and len(g)]
        tiles = np.concatenate(grid_chunks)  # the first GRID_IMAGES, captioned with prompts
        picture = prompt_grid(tiles, prompts[: len(tiles)] if prompts else None)
        atomic_write_bytes(grid_path, encode_png(picture))
        summary["grid"] = str(grid_path.absolute())
    return summary


def _check_sizes(cfg, ex: Execution, shape, count: int, fmt: str, is_image: bool) -> None:
    """Refuse a batch, or an .npz, whose arrays cannot fit in memory."""
    check_fits_memory(f"--batch {cfg.batch}", 16 * cfg.batch * math.prod(shape) * 4, ex.device)
    if fmt == "npz":
        check_fits_memory(
            f"{count} samples in one .npz",
            count * math.prod(shape) * (1 if is_image else 4),
            torch.device("cpu"),
            "; write --format png or draw fewer",
        )


def _provenance(info: dict, conditions, seeds, cfg: SampleConfig, verifier) -> dict:
    """What the samples record of where they came from."""
    meta = {
        "disback_version": __version__,
        "generator": info["file"],
        "generator_sha256": info["sha256"],
        "weights": info.get("weights"),
        "step": info.get("step"),
        "dataset": info.get("dataset"),
        "teacher_sha256": info.get("teacher_sha256"),
        **conditions.provenance(seeds),
    }
    if (verifier is None) != (cfg.best_of == 1):
        raise ConfigError("--best-of K (K > 1) and --verifier RUN go together")
    if verifier is not None:
        conditions.allow_best_of()
        meta.update(best_of=cfg.best_of, best_of_rule=cfg.best_of_rule, **verifier[1])
    return meta


def _draw_and_write(
    draw: tuple, cfg, ex: Execution, reporter, items, writer, grid_path
) -> dict[int, tuple]:
    """This rank's batches: drawn (`draw`: the generator, its conditions and the verifier),
    written (PNGs), and kept for rank 0 (arrays for an .npz, labels, grid images), by batch
    index."""
    generator, conditions, verifier = draw
    batches = [items[i : i + cfg.batch] for i in range(0, len(items), cfg.batch)]
    denoiser = generator.denoiser
    mine: dict[int, tuple] = {}
    reporter.start("sample", len(items), 0)
    for index in range(ex.rank, len(batches), ex.world_size):
        batch = batches[index]
        with ex.autocast():
            x, labels = _draw(generator, denoiser, conditions, verifier, cfg, ex, batch)
        if not bool(torch.isfinite(x).all()):  # e.g. weights so large they overflow
            raise DisbackError(
                f"the generator produced NaN or infinite values (seeds {batch[0][1]}.."
                f"{batch[-1][1]}); nothing more is written"
            )
        x = to_uint8(x) if len(x.shape) == 4 else np.asarray(x, dtype=np.float32)
        writer.write([name for name, _, _ in batch], x)
        first = index * cfg.batch
        mine[index] = (
            x if writer.keeps_arrays else None,
            labels,
            x[: max(0, GRID_IMAGES - first)] if grid_path is not None else None,
        )
        reporter.advance(min(len(items), (index + 1) * cfg.batch))
    return mine


def _draw(generator, denoiser, conditions, verifier, cfg, ex: Execution, batch):
    """One batch of samples on the CPU and their class labels: each seed's noise (and its own
    conditions) from its own stream, the batch's conditions, one step, decoded."""
    seeds = [seed for _, seed, _ in batch]
    if verifier is not None:
        x, cond, _ = best_of_k(
            generator,
            verifier[0],
            seeds,
            denoiser.data_shape,
            conditions.per_seed,
            cfg.best_of,
            ex.device,
            cfg.best_of_rule,
        )
        return x, conditions.labels(cond)
    z, per_seed = seeded_noise(seeds, denoiser.data_shape, conditions.per_seed)
    cond = conditions.batch(batch, per_seed)
    with torch.no_grad():
        x = conditions.decode(generator(z.to(ex.device), **cond.to(ex.device)))
    return x.cpu(), conditions.labels(per_seed)
