"""What `disback export` costs and what the ONNX graph buys: export time and file size of
`--format safetensors` and `--format onnx`, and images/s of onnxruntime against the PyTorch
generator on the CPU; and, for a Stable-Diffusion-shaped teacher, export time and size of
`--format diffusers` (the UNet folder), `--format diffusers --pipeline` and `--format safetensors`.

cifar: the generator is shaped as EDM's class-conditional CIFAR-10 DDPM++ (SongUNet, 3x32x32, 10
classes, augmentation labels, VP preconditioning, 56 M parameters at the default
`--channels 128`), with random weights: neither speed depends on what the weights learned. It
comes from a real run, recorded and backtracked for one iteration, so the exports go through
`export_run` as `disback export` runs them (reading and verifying the generator file, the card).

sd-like: the diffusers folder `benchmarks/memory.py --config sd-like` builds (the tests' fixture
builder at SD-like sizes: a 115 M parameter UNet, 4x32x32 latents, a 4-layer CLIP text encoder;
random weights), recorded (1 iteration, 1 node, batch 1) and backtracked (1 iteration, batch 1).
To keep that cheap the recording's node probe is cut from 512 samples to `--probe-samples` (16,
the record option of that name): the probe only measures where the node stands; nothing
exported depends on it.

Export time is wall-clock seconds of `export_run`, the median of `--export-repeats` exports
into fresh folders. Images/s: the same seeded batch of `--batch` images through both runtimes on
the same number of threads (torch's, given to onnxruntime as intra-op threads), two warm-up calls
each, then `--repeats` rounds that alternate the two, so that a change in machine load affects
both; the median. The outputs are compared too (largest difference relative to the largest
output). `--only cifar|sd-like` runs one part and merges it into `--out` (the CIFAR numbers at
the top level, the SD-like ones under "sd-like"), keeping the other part's numbers. Not part of
the test suite (about ten minutes for cifar on 2 busy CPU cores at full width, most of it the
one-iteration record and backtrack; a few minutes for sd-like):

    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --out benchmarks/results/export-speed.json
    OMP_NUM_THREADS=1 python benchmarks/export_speed.py --only sd-like
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
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
from disback_cli.store.tensorfile import read_safetensors_header

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
FORMATS = {"safetensors": ExportConfig(format="safetensors"), "onnx": ExportConfig(format="onnx")}
SD_FORMATS = {
    "diffusers": ExportConfig(format="diffusers"),
    "diffusers-pipeline": ExportConfig(format="diffusers", pipeline=True),
    "safetensors": ExportConfig(format="safetensors"),
}
SD_RECORD = dict(iters=1, nodes=1, batch=1, device="cpu")
SD_BACKTRACK = dict(iters=1, batch=1, save_every=0, device="cpu")
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


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


def make_sd_run(folder: Path, probe_samples: int) -> tuple[Path, dict]:
    """A finished one-iteration backtrack run from the SD-like teacher folder of memory.py, and
    that folder's sizes."""
    benchmarks = Path(__file__).resolve().parent
    sys.path[:0] = [str(benchmarks), str(benchmarks.parent / "tests")]
    from memory import SD_LIKE
    from t2i_fixtures import make_sd_folder, write_prompts

    teacher = make_sd_folder(folder / "sd-like", **SD_LIKE)
    prompts = write_prompts(folder / "prompts.txt")
    trajectory = folder / "t-sd"
    record = RecordConfig(
        teacher=str(teacher), prompts=str(prompts), probe_samples=probe_samples, **SD_RECORD
    )
    run_record(record, trajectory)
    run_backtrack(BacktrackConfig(**SD_BACKTRACK), trajectory)
    return trajectory, SD_LIKE


def time_exports(
    trajectory: Path, folder: Path, formats: dict[str, ExportConfig], repeats: int
) -> dict[str, dict]:
    """Median wall seconds of `export_run` per format, the files' sizes, the last folder."""
    results = {}
    for label, cfg in formats.items():
        seconds = []
        for repeat in range(repeats):
            out = folder / f"export-{label}-{repeat}"
            started = time.perf_counter()
            summary = export_run(cfg, trajectory, "default", out)
            seconds.append(time.perf_counter() - started)
        files = [f for f in summary["files"] if f != "README.md"]
        results[label] = {
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


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }


def print_exports(exports: dict[str, dict]) -> None:
    for label, result in exports.items():
        size = sum(result["files"].values()) / 2**20
        name = label.replace("-pipeline", " --pipeline")
        print(f"export --format {name:<21} {result['seconds_median']:7.1f} s  {size:8.1f} MiB")


def cifar_report(args: argparse.Namespace, tmp: Path) -> dict:
    """The CIFAR-shaped measurements: the JSON's top-level keys."""
    trajectory, spec = make_run(tmp, args.channels)
    exports = time_exports(trajectory, tmp, FORMATS, args.export_repeats)
    onnx_file = Path(exports["onnx"].pop("folder")) / "generator.onnx"
    speed = images_per_second(trajectory, onnx_file, args.batch, args.repeats)
    exports["safetensors"].pop("folder")
    parameters = sum(p.numel() for p in build_denoiser(spec).parameters())
    print(f"SongUNet 3x32x32, 10 classes, {parameters / 1e6:.1f} M parameters")
    print_exports(exports)
    for name, rate in speed["images_per_second"].items():
        print(f"{name:<12} {rate:7.2f} images/s (batch {args.batch}, {speed['threads']} threads)")
    print(f"largest difference {speed['max_relative_difference']:.1e} of the largest output")
    return {
        "network": {**spec.model_dump(mode="json"), "parameters": parameters},
        "export": exports,
        "inference": speed,
        "machine": machine(),
    }


def unet_parameters(unet_weights: Path) -> int:
    """The parameter count of an exported diffusers UNet, from its safetensors header."""
    _, shapes = read_safetensors_header(unet_weights)
    return sum(math.prod(shape) for shape in shapes.values())


def sd_like_report(args: argparse.Namespace, tmp: Path) -> dict:
    """The SD-like measurements, under the JSON's "sd-like" key."""
    trajectory, sizes = make_sd_run(tmp, args.probe_samples)
    exports = time_exports(trajectory, tmp, SD_FORMATS, args.export_repeats)
    parameters = unet_parameters(Path(exports["diffusers"]["folder"]) / UNET_WEIGHTS)
    for result in exports.values():
        result.pop("folder")
    print(f"sd-like UNet2DConditionModel, {parameters / 1e6:.1f} M parameters")
    print_exports(exports)
    run = {"record": SD_RECORD, "backtrack": SD_BACKTRACK, "probe_samples": args.probe_samples}
    return {
        "sd-like": {
            "teacher": {**sizes, "unet_parameters": parameters},
            "run": run,
            "export": exports,
            "machine": machine(),
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("cifar", "sd-like"), help="one part (default: both)")
    parser.add_argument("--channels", type=int, default=128, help="model_channels (EDM: 128)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of inference")
    parser.add_argument("--export-repeats", type=int, default=3)
    parser.add_argument("--probe-samples", type=int, default=16, help="sd-like node probe")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export-speed.json"))
    args = parser.parse_args()
    parts = {"cifar": cifar_report, "sd-like": sd_like_report}
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name, measure in parts.items():
        if args.only in (None, name):
            with tempfile.TemporaryDirectory() as tmp:
                report.update(measure(args, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
