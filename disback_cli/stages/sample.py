"""One-step sampling from a trained generator (or a teacher's Heun sampler) into an .npz file or
an EDM-layout PNG folder."""

from __future__ import annotations

import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from disback_cli import __version__
from disback_cli.config import SampleConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.method.generator import load_generator
from disback_cli.method.sampling import (
    MAX_SAMPLES,
    best_of_k,
    one_step_batches,
    parse_seeds,
    seeded_noise,
)
from disback_cli.models.conditioning import condition_source
from disback_cli.models.ratio import load_ratio
from disback_cli.models.text_to_image.sampling import open_sampling
from disback_cli.models.text_to_image.text import TextEncoder, read_prompts
from disback_cli.models.text_to_image.vae import LatentDecoder
from disback_cli.runtime.devices import check_fits_memory
from disback_cli.runtime.parallel import execution, process_of
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.fileio import atomic_write_bytes
from disback_cli.store.images import encode_png, grid, png_name, to_uint8, upscale
from disback_cli.store.manifests import verifier_of_run
from disback_cli.store.samples import LABELS, PROMPTS, prepare_folder, write_record

GRID_IMAGES = 64
PNG_WRITERS = 4  # threads encoding and writing PNGs (zlib and file writes release the GIL)


def sample_seeds(cfg: SampleConfig) -> list[int]:
    if cfg.seeds is not None and cfg.n is not None:
        raise ConfigError("give either -n or --seeds, not both")
    if cfg.seeds is not None:
        return parse_seeds(cfg.seeds)
    return list(range(cfg.n if cfg.n is not None else 1000))


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
    """Sample a generator file one step per seed (see `write_samples_of`); a text-to-image
    generator with the text encoders and VAE its file names (from `model_folder` if moved);
    with `verifier_run` (a diffratio run) the best of `cfg.best_of` candidates per seed."""
    device = execution(cfg).device
    generator, info = load_generator(generator_path, device, expected_sha256, cfg.verify)
    text = None
    if "text_to_image" in info:
        text = open_sampling(info["text_to_image"], device, cfg.verify, model_folder)
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
        generator, info, cfg, out, reporter, grid_out, default_dir, text, verifier
    )


def _write_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(image), durable=False)


def write_samples_of(
    generator: nn.Module,
    info: dict,
    cfg: SampleConfig,
    out: Path | None = None,
    reporter: Reporter | None = None,
    grid_out: Path | bool = False,
    default_dir: Path = Path("."),
    text: tuple[TextEncoder, LatentDecoder] | None = None,
    verifier: tuple[torch.nn.Module, dict] | None = None,
) -> dict:
    """Sample per seed; write samples (or PNGs), seeds, labels and provenance (`info`).

    Vectors go to an .npz (`samples` float32). Images become uint8 (x * 127.5 + 128) and go to a
    PNG folder in EDM's layout with `dataset.json` and a completion record `provenance.json`
    (see `samplefolder`), or to an .npz (`images` N,H,W,C uint8). A text-to-image generator
    (`text`: its text encoder and VAE) draws `-n` images per prompt of `cfg.prompts`, decodes
    them, and lists each image's prompt and seed in `prompts.json`. Sizes whose arrays cannot fit
    in memory are refused before anything is written. With a `verifier` (a DiffRatio ratio
    network and what identifies it) each seed's sample is the best of `cfg.best_of` candidates.
    """
    ex, reporter = process_of(cfg, reporter)
    seeds = sample_seeds(cfg)
    generator = generator.to(ex.device)
    denoiser = generator.denoiser
    if (text is None) != (cfg.prompts is None):
        raise ConfigError(
            "--prompts is for text-to-image generators"
            if text is None
            else "a text-to-image generator needs --prompts FILE"
        )
    prompts, prompts_sha256 = read_prompts(cfg.prompts) if text else ([], None)
    # (image name, seed, prompt index) of every image, in the order they are written
    items = (
        [(j * len(seeds) + i, seed, j) for j in range(len(prompts)) for i, seed in enumerate(seeds)]
        if text
        else [(s, s, -1) for s in seeds]
    )
    if len(items) > MAX_SAMPLES:
        raise ConfigError(f"{len(items)} images in one call, more than {MAX_SAMPLES}")
    shape = denoiser.data_shape
    if text:
        _, height, width = shape
        shape = (3, height * text[0].folder.vae_scale, width * text[0].folder.vae_scale)
    is_image = len(shape) == 3
    fmt = ("png" if is_image else "npz") if cfg.format == "auto" else cfg.format
    if fmt == "png" and not is_image:
        raise ConfigError("--format png needs an image generator; use npz for vector data")
    if grid_out and not is_image:
        raise ConfigError("--grid needs an image generator")
    if cfg.class_label is not None and not cfg.class_label < denoiser.label_dim:
        raise ConfigError(
            f"--class {cfg.class_label} is out of range for {denoiser.label_dim} classes"
        )
    out = out or default_dir / ("samples" if fmt == "png" else "samples.npz")
    grid_path = None  # grid_out: a path, or True for OUT-grid.png beside the output
    if grid_out:
        grid_path = (
            grid_out if isinstance(grid_out, Path) else out.with_name(f"{out.stem}-grid.png")
        )
    sample_bytes = math.prod(shape) * (1 if is_image else 4)
    check_fits_memory(f"--batch {cfg.batch}", 16 * cfg.batch * math.prod(shape) * 4, ex.device)
    if fmt == "npz":
        check_fits_memory(
            f"{len(items)} samples in one .npz",
            len(items) * sample_bytes,
            torch.device("cpu"),
            "; write --format png or draw fewer",
        )
    meta = {
        "disback_version": __version__,
        "generator": info["file"],
        "generator_sha256": info["sha256"],
        "weights": info.get("weights"),
        "step": info.get("step"),
        "dataset": info.get("dataset"),
        "teacher_sha256": info.get("teacher_sha256"),
    }
    if text:
        meta.update(
            prompts=str(Path(cfg.prompts).absolute()),
            prompts_sha256=prompts_sha256,
            per_prompt=len(seeds),
        )
    if (verifier is None) != (cfg.best_of == 1):
        raise ConfigError("--best-of K (K > 1) and --verifier RUN go together")
    if verifier is not None:
        if text:
            raise ConfigError("--best-of is not available for text-to-image generators")
        meta.update(best_of=cfg.best_of, **verifier[1])
    names = [name for name, _, _ in items]
    if fmt == "png":  # every rank looks before rank 0 replaces an earlier sample's files
        prepare_folder(out, MAX_SAMPLES, remove=False)
        ex.barrier()
        if ex.is_main:
            removed = prepare_folder(out, MAX_SAMPLES, remove=True)
            if removed:
                reporter.note(f"{out}: replaced {removed} images of an earlier `disback sample`")
            write_record(out, "writing", names, meta)
        ex.barrier()
    ex.prepare(denoiser)
    conditions = condition_source(denoiser.label_dim, cfg.class_label)

    def draw(batch_items: list[tuple[int, int, int]]) -> tuple[torch.Tensor, np.ndarray | None]:
        """One batch of images (or vectors) on the CPU and their class labels."""
        batch_seeds = [seed for _, seed, _ in batch_items]
        with ex.autocast():
            if verifier is not None:
                x, cond, _ = best_of_k(
                    generator,
                    verifier[0],
                    batch_seeds,
                    denoiser.data_shape,
                    conditions,
                    cfg.best_of,
                    ex.device,
                )
                return x, conditions.labels(cond)
            if text is None:
                x, cond = next(
                    one_step_batches(
                        generator,
                        batch_seeds,
                        denoiser.data_shape,
                        conditions,
                        len(batch_seeds),
                        ex.device,
                    )
                )
                return x, conditions.labels(cond)
            encoder, decoder = text
            z, _ = seeded_noise(batch_seeds, denoiser.data_shape)
            cond = encoder.encode([prompts[j] for _, _, j in batch_items])
            with torch.no_grad():
                latents = generator(z.to(ex.device), **cond.to(ex.device))
        return decoder(latents).cpu(), None

    # Batches of images go round-robin to the ranks; each rank writes its own PNGs and sends
    # arrays (npz), labels and grid images to rank 0.
    batches = [items[i : i + cfg.batch] for i in range(0, len(items), cfg.batch)]
    mine: dict[int, tuple] = {}
    writes = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=PNG_WRITERS) as writer:
        reporter.start("sample", len(items), 0)
        for index in range(ex.rank, len(batches), ex.world_size):
            batch_items = batches[index]
            x, labels = draw(batch_items)
            if not bool(torch.isfinite(x).all()):  # e.g. weights so large they overflow
                raise DisbackError(
                    f"the generator produced NaN or infinite values (seeds {batch_items[0][1]}.."
                    f"{batch_items[-1][1]}); nothing more is written"
                )
            x = to_uint8(x) if is_image else np.asarray(x, dtype=np.float32)
            if fmt == "png":  # encoded and written on threads while the next batch is generated
                writes += [
                    writer.submit(_write_png, out / png_name(name), image)
                    for image, (name, _, _) in zip(x, batch_items, strict=True)
                ]
            first = index * cfg.batch
            mine[index] = (
                x if fmt == "npz" else None,
                labels,
                x[: max(0, GRID_IMAGES - first)] if grid_path is not None else None,
            )
            reporter.advance(min(len(items), (index + 1) * cfg.batch))
    for write in writes:
        write.result()  # re-raises a failed write (e.g. a full disk)
    if fmt == "png":
        os.sync()  # one flush for all images instead of an fsync per file
    gathered = ex.gather_to_main(mine)
    seconds = time.perf_counter() - started  # generating and writing, all ranks together
    summary = {
        "out": str(out.absolute()),
        "format": fmt,
        "n": len(items),
        "seconds": seconds,
        "samples_per_second": len(items) / seconds,
    }
    if gathered is None:  # other ranks: rank 0 writes the rest
        return summary
    parts = [part for rank_parts in gathered for part in rank_parts.items()]
    ordered = [value for _, value in sorted(parts, key=lambda item: item[0])]
    chunks = [c for c, _, _ in ordered if c is not None]
    labels = [lab for _, lab, _ in ordered if lab is not None]
    grid_chunks = [g for _, _, g in ordered if g is not None and len(g)]
    all_labels = np.concatenate(labels).astype(np.int64) if labels else None
    summary.update(meta)
    if fmt == "png":
        entries = None
        if all_labels is not None:
            entries = [[png_name(s), int(y)] for s, y in zip(seeds, all_labels, strict=True)]
        atomic_write_bytes(out / LABELS, json.dumps({"labels": entries}).encode())
        if text:
            listing = [
                {"file": png_name(name), "prompt": prompts[j], "seed": seed}
                for name, seed, j in items
            ]
            atomic_write_bytes(out / PROMPTS, json.dumps({"images": listing}, indent=0).encode())
        write_record(out, "complete", names, meta)  # last: the folder is now complete
    else:
        arrays = {
            ("images" if is_image else "samples"): np.concatenate(chunks),
            "seeds": np.asarray([seed for _, seed, _ in items], dtype=np.int64),
            "meta": np.asarray(json.dumps(meta)),
        }
        if all_labels is not None:
            arrays["labels"] = all_labels
        if text:
            arrays["prompts"] = np.asarray([prompts[j] for _, _, j in items])
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        summary["sha256"] = atomic_write_bytes(out, buffer.getvalue())
    if grid_path is not None:
        atomic_write_bytes(grid_path, encode_png(upscale(grid(np.concatenate(grid_chunks)))))
        summary["grid"] = str(grid_path.absolute())
    return summary
