"""Peak memory of each stage at the teachers' real shapes, next to what must be resident.

Each stage runs in a fresh process on a teacher with the released network configuration and
random weights (memory does not depend on what the weights learned):

* cifar10: DDPM++ (SongUNet), 3x32x32, 10 classes, dropout 0.13 (edm-cifar10-32x32-cond-vp);
* imagenet64: ADM (DhariwalUNet), 3x64x64, 1000 classes, dropout 0.1 (edm-imagenet-64x64-cond-adm);
* sd-like: a diffusers model folder shaped like Stable Diffusion at a tenth of its size (UNet of
  115 M parameters, 4x32x32 latents, a 4-layer CLIP text encoder), with `--lora` recording
  low-rank nodes (rank 16): what the SD 1.5 / SDXL memory arithmetic in the README rests on;
* sdxl-like: SDXL's UNet block structure (DownBlock2D then two cross-attention levels with 1, 2
  and 10 transformer layers, 2 ResNet layers a block, text-time conditioning) at 0.3 of its
  widths (96/192/384 channels: 204 M parameters, 4x16x16 latents), with SDXL-shaped text encoders
  of toy size: what the sharding arithmetic in the README rests on.

`--parallel ddp|fsdp --world N` runs `record` and `backtrack` under torchrun with N processes and
reports the largest peak among them (per process), e.g. for the sharding table:

    python benchmarks/memory.py --config sdxl-like --stages load,record --work W
    python benchmarks/memory.py --config sdxl-like --stages backtrack --parallel fsdp \\
        --world 4 --work W

Stages: `load` (the teacher alone: the floor under every other number), `record` (2 iterations,
1 node), `backtrack` (2 iterations) and `sample`. Reported per stage: peak host RSS (VmHWM) and,
on CUDA, peak allocated device memory; beside them the arithmetic of the weight-sized copies the
stage must hold. Not part of the test suite (CPU: tens of minutes for cifar10):

    python benchmarks/memory.py --config cifar10 --device cpu --batch 2
    python benchmarks/memory.py --config imagenet64 --device cuda --batch 16

`--probe-samples` shrinks the recording's node probe (512 samples; record's option of that name)
to save time on a CPU; the probe runs in chunks of 4 batches (no gradients), so only its stored
inputs (a few MB) depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from disback_cli.models.networks import NetworkSpec

SONG = dict(
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=128,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    augment_dim=9,
)
ADM = dict(
    model_channels=192,
    channel_mult=[1, 2, 3, 4],
    num_blocks=3,
    attn_resolutions=[32, 16, 8],
    dropout=0.1,
)
CIFAR10 = NetworkSpec(
    arch="SongUNet", precond="vp", data_shape=(3, 32, 32), label_dim=10, arch_kwargs=SONG
)
IMAGENET64 = NetworkSpec(
    arch="DhariwalUNet", precond="edm", data_shape=(3, 64, 64), label_dim=1000, arch_kwargs=ADM
)
CONFIGS = {"cifar10": CIFAR10, "imagenet64": IMAGENET64, "sd-like": None, "sdxl-like": None}
SD_LIKE = dict(widths=(192, 384, 768), latent=32, text_width=768, text_layers=4)
SDXL_WIDTHS = (96, 192, 384)  # SDXL's 320/640/1280 x 0.3
SDXL_LATENT = 16
LORA_RANK = 16
STAGES = ("load", "record", "backtrack", "sample")
# Weight-sized tensors each stage must hold (the arithmetic beside the measurement).
RESIDENT = {
    "load": {"teacher": 1},
    "record": {
        "teacher (also G0)": 1,
        "auxiliary model": 1,
        "its gradient": 1,
        "two Adam moments": 2,
    },
    "backtrack": {
        "teacher": 1,
        "generator": 1,
        "generator gradient": 1,
        "generator EMA": 1,
        "fake score": 1,
        "fake gradient": 1,
        "target node": 1,
        "next node (prefetched)": 1,
        "two Adam moments x2": 4,
    },
    "sample": {"generator": 1},
}
RESIDENT_TEXT = {  # sd-like, a 2-node path: the teacher is let go once node 1 is the target
    **RESIDENT,
    "backtrack": {
        "generator": 1,
        "generator gradient": 1,
        "generator EMA": 1,
        "fake score": 1,
        "fake gradient": 1,
        "target node": 1,
        "next node (prefetched)": 1,
        "two Adam moments x2": 4,
    },
}
FROZEN_TARGETS = ("target node", "next node (prefetched)")  # held in bf16 by --frozen-dtype
# --backtrack-lora R: generator and fake score frozen, their adapters (small) train
BACKTRACK_LORA = {
    "generator (frozen; adapters train)": 1,
    "fake score (frozen; adapters train)": 1,
    "target node": 1,
    "next node (prefetched)": 1,
}
RESIDENT_LORA = {  # --lora: only adapters train; targets are one adapted teacher copy
    "load": {"teacher": 1},
    "record": {"teacher (also G0)": 1, "auxiliary model (frozen base)": 1},
    "backtrack": {
        "adapted teacher (every target)": 1,
        "generator": 1,
        "generator gradient": 1,
        "generator EMA": 1,
        "fake score": 1,
        "fake gradient": 1,
        "two Adam moments x2": 4,
    },
    "sample": {"generator": 1},
}


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_teacher(config: str, folder: Path) -> Path:
    from disback_cli.models.denoiser_files import save_denoiser
    from disback_cli.models.networks import build_denoiser

    if config == "sd-like":  # built by the tests' fixture builder, with SD-like sizes
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from t2i_fixtures import make_sd_folder, write_prompts

        path = folder / "sd-like"
        if not path.exists():
            make_sd_folder(path, **SD_LIKE)
            write_prompts(folder / "prompts.txt")
        return path

    if config == "sdxl-like":
        return make_sdxl_like(folder)
    path = folder / f"{config}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        spec = CONFIGS[config]
        info = {
            "role": "teacher",
            "train_sigma": {"p_mean": -1.2, "p_std": 1.2},
            "edm": {"class_name": "benchmark", "model_type": spec.arch},
        }
        save_denoiser(path, build_denoiser(spec), spec, info)
    return path


def make_sdxl_like(folder: Path) -> Path:
    """The tests' SDXL-shaped folder (two text encoders, text-time conditioning) with its UNet
    replaced by one of SDXL's block structure."""
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from t2i_fixtures import make_sd_folder, write_prompts

    path = folder / "sdxl-like"
    if path.exists():
        return path
    make_sd_folder(path, xl=True, latent=SDXL_LATENT, text_width=64)
    write_prompts(folder / "prompts.txt")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=SDXL_LATENT,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=SDXL_WIDTHS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=64,  # the fixture's two 32-wide text encoders
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 8,
    ).save_pretrained(path / "unet")
    return path


def run_name(parallel: str, world: int, frozen_dtype: str = "fp32", lora: int = 0) -> str:
    if (parallel, world, frozen_dtype, lora) == ("ddp", 1, "fp32", 0):
        return "default"
    name = f"{parallel}-{world}" + ("" if frozen_dtype == "fp32" else f"-{frozen_dtype}")
    return name + (f"-lora{lora}" if lora else "")


def run_stage(
    stage: str,
    teacher: Path,
    work: Path,
    batch: int,
    device: str,
    probe: int,
    lora: bool,
    parallel: str = "ddp",
    world: int = 1,
    frozen_dtype: str = "fp32",
    backtrack_lora: int = 0,
) -> dict:
    """One stage in this process; returns its measurements."""
    from disback_cli.config import BacktrackConfig, RecordConfig, SampleConfig
    from disback_cli.method.generator import load_generator
    from disback_cli.models.teachers import open_teacher
    from disback_cli.models.text_to_image.sampling import open_sampling
    from disback_cli.stages import record as record_module
    from disback_cli.stages.backtrack import run_backtrack
    from disback_cli.stages.sample import write_samples_of
    from disback_cli.store.layout import backtrack_dir
    from disback_cli.store.manifests import BacktrackManifest, read_manifest

    started = time.perf_counter()
    trajectory = work / "trajectory"
    text = {"prompts": str(work / "prompts.txt")} if teacher.is_dir() else {}
    if stage == "load" and world > 1:  # read and placed as record and backtrack place it
        from disback_cli.runtime.parallel import execution

        ex = execution(BacktrackConfig(device=device, parallel=parallel))
        ex.layout.place_teacher(lambda: open_teacher(str(teacher), ex.device), ex.device)
    elif stage == "load":
        open_teacher(str(teacher), device)
    elif stage == "record":
        lora_rank = {"lora_rank": LORA_RANK} if lora else {}
        nodes = 2 if text else 1  # text: the first target is a node, the next one prefetched
        cfg = RecordConfig(
            teacher=str(teacher),
            iters=2,
            nodes=nodes,
            batch=batch,
            probe_samples=probe,
            device=device,
            parallel=parallel,
            **text,
            **lora_rank,
        )
        record_module.run_record(cfg, trajectory)
    elif stage == "backtrack":
        cfg = BacktrackConfig(
            iters=2,
            batch=batch,
            save_every=0,
            log_every=1,
            device=device,
            parallel=parallel,
            frozen_dtype=frozen_dtype,
            lora_rank=backtrack_lora or None,
        )
        run_backtrack(cfg, trajectory, run_name(parallel, world, frozen_dtype, backtrack_lora))
    else:
        run = backtrack_dir(trajectory, run_name(parallel, world, frozen_dtype, backtrack_lora))
        manifest = read_manifest(run, BacktrackManifest)
        path = run / manifest.generator_ema.file
        generator, info = load_generator(path, torch.device(device))
        fmt, parts = "npz", None
        if text:
            fmt, parts = "png", open_sampling(info["text_to_image"], torch.device(device))
        cfg = SampleConfig(n=2 * batch, batch=batch, format=fmt, device=device, **text)
        write_samples_of(generator, info, cfg, work / "samples", text=parts)
    result = {
        "stage": stage,
        "rank": int(os.environ.get("RANK", "0")),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_gb": peak_rss_bytes() / 1e9,
    }
    if torch.cuda.is_available() and device.startswith("cuda"):
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cifar10")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="per-iteration batch of each stage")
    parser.add_argument("--probe-samples", type=int, default=512)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--work", type=Path, help="folder for the teacher and runs (kept)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--lora", action="store_true", help="sd-like: record LoRA nodes")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--world", type=int, default=1, help="processes of record and backtrack")
    parser.add_argument(
        "--frozen-dtype", choices=("fp32", "bf16"), default="fp32", help="backtrack's targets"
    )
    parser.add_argument(
        "--backtrack-lora", type=int, default=0, help="backtrack --lora-rank (0: every weight)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="disback-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        result = run_stage(
            args.child,
            make_teacher(args.config, work),
            work,
            args.batch,
            args.device,
            args.probe_samples,
            args.lora,
            args.parallel,
            args.world,
            args.frozen_dtype,
            args.backtrack_lora,
        )
        # One write per process: the processes of a torchrun launch share this pipe.
        os.write(sys.stdout.fileno(), (json.dumps(result) + "\n").encode())
        return

    from disback_cli.models.networks import build_denoiser

    teacher = make_teacher(args.config, work)
    if args.config in ("sd-like", "sdxl-like"):
        from disback_cli.models.teachers import open_teacher

        params = open_teacher(str(teacher)).parameter_count
    else:
        params = sum(p.numel() for p in build_denoiser(CONFIGS[args.config]).parameters())
    resident = RESIDENT_LORA if args.lora else RESIDENT
    if args.config in ("sd-like", "sdxl-like") and not args.lora:
        resident = RESIDENT_TEXT
    copy_gb = params * 4 / 1e9
    print(
        f"{args.config}: {params / 1e6:.1f} M parameters, {copy_gb:.3f} GB per fp32 copy; "
        f"batch {args.batch} per process, probe {args.probe_samples} samples, device "
        f"{args.device}, --parallel {args.parallel}, {args.world} process(es)"
    )
    rows = []
    for stage in args.stages.split(","):
        distributed = args.world > 1 and stage in ("load", "record", "backtrack")
        launcher = [sys.executable]
        if distributed:
            launcher += [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.world}",
            ]
        command = [
            *launcher,
            __file__,
            "--child",
            stage,
            "--config",
            args.config,
            "--device",
            args.device,
            "--batch",
            str(args.batch),
            "--work",
            str(work),
            "--probe-samples",
            str(args.probe_samples),
            "--parallel",
            args.parallel,
            "--world",
            str(args.world),
            "--frozen-dtype",
            args.frozen_dtype,
            "--backtrack-lora",
            str(args.backtrack_lora),
        ] + (["--lora"] if args.lora else [])
        done, host_peak = run_watched(command)
        if done.returncode:
            sys.exit(f"stage {stage} failed:\n{done.stderr}")
        ranks = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"stage"')]
        row = max(ranks, key=lambda r: r["peak_rss_gb"])  # the largest process
        row["peak_rss_gb_per_rank"] = [r["peak_rss_gb"] for r in sorted(ranks, key=_rank)]
        row["world"], row["parallel"] = (args.world, args.parallel) if distributed else (1, "ddp")
        row["peak_host_rss_gb"] = host_peak / 1e9
        shards = args.world if distributed and args.parallel == "fsdp" else 1
        held = dict(
            BACKTRACK_LORA if args.backtrack_lora and stage == "backtrack" else resident[stage]
        )
        if args.frozen_dtype == "bf16" and stage == "backtrack":
            for what in FROZEN_TARGETS:
                held[f"{what} (bf16)"] = held.pop(what) / 2
        row["resident_copies"] = sum(held.values())
        # sharded: every copy split over the processes, and the teacher read whole first
        row["resident_gb"] = copy_gb * (row["resident_copies"] / shards + (shards > 1))
        rows.append(row)
        cuda = f", peak CUDA {row['peak_cuda_gb']:.2f} GB" if "peak_cuda_gb" in row else ""
        split = f" / {shards} shards + 1 whole teacher" if shards > 1 else ""
        print(
            f"{stage:>9}: peak RSS {row['peak_rss_gb']:.2f} GB (largest of {len(ranks)} "
            f"process(es); all of them together {row['peak_host_rss_gb']:.2f} GB){cuda}; "
            f"must hold {row['resident_copies']} weight copies{split} = "
            f"{row['resident_gb']:.2f} GB ({', '.join(held)}); {row['seconds']} s"
        )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "config": args.config,
                    "lora": args.lora,
                    "parameters": params,
                    "batch": args.batch,
                    "device": args.device,
                    "probe_samples": args.probe_samples,
                    "parallel": args.parallel,
                    "world": args.world,
                    "frozen_dtype": args.frozen_dtype,
                    "backtrack_lora": args.backtrack_lora,
                    "stages": rows,
                },
                indent=2,
            )
            + "\n"
        )


def run_watched(command: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `command` and sample the summed RSS of it and every process below it (the launcher
    and a torchrun launch's workers) every 20 ms: the host's peak, which per-process high-water
    marks cannot give (they need not peak at the same moment)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import process_tree  # the tests' own walk of /proc

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=child_env())
        peak = 0
        while proc.poll() is None:
            peak = max(peak, sum(map(_rss_bytes, process_tree(proc.pid))))
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, out.read(), err.read()), peak


def _rss_bytes(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0  # ended between the listing and now
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def child_env() -> dict[str, str]:
    """The stages' environment: glibc's mmap threshold fixed at 64 KiB. By default it rises to
    the largest block freed (up to 32 MiB), after which FSDP's per-block gather and scatter
    buffers come from the heap and stay in the process's RSS once freed: on the CPU a 2-process
    sharded backtrack then peaked at twice its live tensors. Fixed, freed buffers go back to the
    system and RSS follows the tensors (whole copies are unaffected within a few percent)."""
    return {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}


def _rank(row: dict) -> int:
    return row["rank"]


if __name__ == "__main__":
    main()
