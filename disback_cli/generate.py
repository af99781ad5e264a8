"""One-step sampling from a trained generator into an .npz file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from disback_cli import __version__
from disback_cli.checkpoint import load_denoiser
from disback_cli.config import SampleConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.fileio import atomic_write_bytes
from disback_cli.generator import OneStepGenerator
from disback_cli.runtime import Reporter, SilentReporter, resolve_device
from disback_cli.sampling import one_step_batches, parse_seeds
from disback_cli.trajectory import BacktrackManifest, backtrack_dir, read_manifest


def generator_file_of_run(trajectory: Path, name: str, weights: str) -> tuple[Path, str]:
    """Latest generator file of a backtrack run and the sha256 its manifest gives for it."""
    run_dir = backtrack_dir(trajectory, name)
    if not (run_dir / "manifest.json").exists():
        raise DisbackError(f"{run_dir}: no backtrack run named {name!r} (run `disback backtrack`)")
    manifest = read_manifest(run_dir, BacktrackManifest)
    ref = manifest.generator_ema if weights == "ema" else manifest.generator
    if ref is None:
        raise DisbackError(f"{run_dir}: the run has not saved a generator yet")
    return run_dir / ref.file, ref.sha256


def load_generator(
    path: Path, device: torch.device, expected_sha256: str | None = None
) -> tuple[OneStepGenerator, dict]:
    loaded = load_denoiser(path, device)
    if loaded.info.get("role") != "generator":
        raise DisbackError(f"{path}: not a generator file (role {loaded.info.get('role')!r})")
    if expected_sha256 is not None and loaded.sha256 != expected_sha256:
        raise DisbackError(f"{path}: sha256 does not match the run manifest (file changed?)")
    generator = OneStepGenerator(loaded.denoiser, float(loaded.info["sigma_init"]))
    return generator.eval(), {**loaded.info, "sha256": loaded.sha256, "file": str(path)}


def sample_seeds(cfg: SampleConfig) -> list[int]:
    if cfg.seeds is not None and cfg.n is not None:
        raise ConfigError("give either -n or --seeds, not both")
    if cfg.seeds is not None:
        return parse_seeds(cfg.seeds)
    return list(range(cfg.n if cfg.n is not None else 1000))


def write_samples(
    cfg: SampleConfig, generator_path: Path, out: Path, expected_sha256: str | None = None,
    reporter: Reporter | None = None,
) -> dict:  # fmt: skip
    """Sample one step per seed and write samples, seeds, labels and provenance to `out`."""
    reporter = reporter or SilentReporter()
    device = resolve_device(cfg.device)
    seeds = sample_seeds(cfg)
    generator, info = load_generator(generator_path, device, expected_sha256)
    denoiser = generator.denoiser
    if cfg.class_label is not None and not cfg.class_label < denoiser.label_dim:
        raise ConfigError(
            f"--class {cfg.class_label} is out of range for {denoiser.label_dim} classes"
        )
    chunks, labels = [], []
    reporter.start("sample", len(seeds), 0)
    for x, y in one_step_batches(
        generator,
        seeds,
        denoiser.data_shape,
        denoiser.label_dim,
        cfg.batch,
        device,
        cfg.class_label,
    ):
        chunks.append(x)
        if y is not None:
            labels.append(y.argmax(dim=1))
        reporter.advance(sum(len(c) for c in chunks))
    meta = {
        "disback_version": __version__,
        "generator": info["file"],
        "generator_sha256": info["sha256"],
        "weights": info.get("weights"),
        "step": info.get("step"),
        "dataset": info.get("dataset"),
        "teacher_sha256": info.get("teacher_sha256"),
    }
    arrays = {
        "samples": torch.cat(chunks).numpy().astype(np.float32),
        "seeds": np.asarray(seeds, dtype=np.int64),
        "meta": np.asarray(json.dumps(meta)),
    }
    if labels:
        arrays["labels"] = torch.cat(labels).numpy().astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    digest = atomic_write_bytes(out, buffer.getvalue())
    return {"out": str(out), "n": len(seeds), "sha256": digest, **meta}


def read_samples(path: Path) -> tuple[torch.Tensor, dict]:
    """Samples and provenance from an .npz written by `disback sample` (or any `samples` array)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if "samples" not in data:
                raise DisbackError(f"{path}: no 'samples' array in this .npz")
            samples = torch.from_numpy(np.array(data["samples"], dtype=np.float32))
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
    except FileNotFoundError:
        raise DisbackError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DisbackError(f"{path}: not a readable .npz file ({exc})") from None
    return samples, meta
