"""What `disback export` costs and what the ONNX graph buys: export time and file size of
`--format safetensors` and `--format onnx`, and images/s of onnxruntime against the PyTorch
generator on the CPU.

The generator is shaped as EDM's class-conditional CIFAR-10 DDPM++ (SongUNet, 3x32x32, 10
classes, augmentation labels, VP preconditioning, 56 M parameters at the default
`--channels 128`), with random weights: neither speed depends on what the weights learned. It
comes from a real run, recorded and backtracked for one iteration, so the exports go through
`export_run` as `disback export` runs them (reading and verifying the generator file, the card).

Export time is wall-clock seconds of `export_run`, the median of `--export-repeats` exports
into fresh folders. Images/s: the same seeded batch of `--batch` images through both runtimes on
the same number of threads (torch's, given to onnxruntime as intra-op threads), two warm-up calls
each, then `--repeats` rounds that alternate the two, so that a change in machine load affects
both; the median. The outputs are compared too (largest difference relative to the largest
output). Not part of the test suite (about ten minutes on 2 busy CPU cores at full width, most
of it the one-iteration record and backtrack):

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --out benchmarks/results/export-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.config.export import ExportConfig
from disback_cli.method.generator import load_generator
from disback_cli.method.sampling import seeded_noise
from disback_cli.models.conditioning import condition_source
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.networks import NetworkSpec, build_denoiser
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.export import export_run
from disback_cli.stages.record import run_record
from disback_cli.store.manifests import generator_file_of_run

CIFAR10_SONG = dict(  # EDM's cifar10 DDPM++ (edm-cifar10-32x32-cond-vp), model_channels aside
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    augment_dim=9,
)
FORMATS = ("safetensors", "onnx")


def make_run(folder: Path, channels: int) -> tuple[Path, NetworkSpec]:
    """A finished one-iteration backtrack run from a CIFAR-shaped teacher file."""
    spec = NetworkSpec(
        arch="SongUNet",
        precond="vp",
        data_shape=(3, 32, 32),
        label_dim=10,
        arch_kwargs={**CIFAR10_SONG, "model_channels": channels},
    )
    torch.manual_seed(0)
    teacher = folder / "cifar10-shaped.safetensors"
    info = {"role": "teacher", "train_sigma": {"p_mean": -1.2, "p_std": 1.2}}
    save_denoiser(teacher, build_denoiser(spec), spec, info)
    trajectory = folder / "t"
    record = RecordConfig(teacher=str(teacher), iters=1, nodes=1, batch=2, device="cpu")
    run_record(record, trajectory)
    run_backtrack(BacktrackConfig(iters=1, batch=2, save_every=0, device="cpu"), trajectory)
    return trajectory, spec


def time_exports(trajectory: Path, folder: Path, repeats: int) -> dict[str, dict]:
    """Median wall seconds of `export_run` per format, the files' sizes, the last folder."""
    results = {}
    for fmt in FORMATS:
        seconds = []
        for repeat in range(repeats):
            out = folder / f"export-{fmt}-{repeat}"
            started = time.perf_counter()
            summary = export_run(ExportConfig(format=fmt), trajectory, "default", out)
            seconds.append(time.perf_counter() - started)
        files = [f for f in summary["files"] if f != "README.md"]
        results[fmt] = {
            "seconds_median": statistics.median(seconds),
            "seconds": seconds,
            "files": {f: (out / f).stat().st_size for f in files},
            "folder": str(out),
        }
    return results


def images_per_second(trajectory: Path, onnx_file: Path, batch: int, repeats: int) -> dict:
    """Both runtimes on the same batch and threads (see the module docstring)."""
    path, sha256 = generator_file_of_run(trajectory, "default", "ema")
    generator, _ = load_generator(path, torch.device("cpu"), sha256)
    spec_shape, label_dim = generator.denoiser.data_shape, generator.denoiser.label_dim
    z, cond = seeded_noise(range(batch), spec_shape, condition_source(label_dim))
    labels = cond["class_labels"]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    feed = {"z": z.numpy(), "class_labels": labels.numpy()}

    def pytorch() -> np.ndarray:
        with torch.no_grad():
            return generator(z, class_labels=labels).numpy()

    def onnxruntime() -> np.ndarray:
        return session.run(["x"], feed)[0]

    runners = {"pytorch": pytorch, "onnxruntime": onnxruntime}
    outputs = {name: [run() for _ in range(2)][-1] for name, run in runners.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    difference = np.abs(outputs["onnxruntime"] - outputs["pytorch"]).max()
    return {
        "batch": batch,
        "threads": torch.get_num_threads(),
        "images_per_second": {n: batch / statistics.median(s) for n, s in seconds.items()},
        "seconds_per_batch": seconds,
        "max_relative_difference": float(difference / np.abs(outputs["pytorch"]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=128, help="model_channels (EDM: 128)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of inference")
    parser.add_argument("--export-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export-speed.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trajectory, spec = make_run(Path(tmp), args.channels)
        exports = time_exports(trajectory, Path(tmp), args.export_repeats)
        onnx_file = Path(exports["onnx"]["folder"]) / "generator.onnx"
        speed = images_per_second(trajectory, onnx_file, args.batch, args.repeats)
    parameters = sum(p.numel() for p in build_denoiser(spec).parameters())
    for result in exports.values():
        result.pop("folder")
    report = {
        "network": {**spec.model_dump(mode="json"), "parameters": parameters},
        "export": exports,
        "inference": speed,
        "machine": {
            "cores": os.cpu_count(),
            "load_average_at_end": os.getloadavg()[0],
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"SongUNet 3x32x32, 10 classes, {parameters / 1e6:.1f} M parameters")
    for fmt, result in exports.items():
        size = sum(result["files"].values()) / 2**20
        print(f"export --format {fmt:<11} {result['seconds_median']:7.1f} s  {size:8.1f} MiB")
    for name, rate in speed["images_per_second"].items():
        print(f"{name:<12} {rate:7.2f} images/s (batch {args.batch}, {speed['threads']} threads)")
    print(f"largest difference {speed['max_relative_difference']:.1e} of the largest output")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
