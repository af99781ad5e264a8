"""What sharding costs in time: seconds per backtrack iteration under `--parallel fsdp` against
`--parallel ddp`, both on 2 torchrun processes (gloo on the CPU), on the same network and batch.

FSDP gathers each block's weights before its forward and backward passes and reduce-scatters the
gradients; whole copies only all-reduce the gradients once. On one machine's CPU cores the extra
collectives are all overhead (there is no memory to save that matters here); the number says how
much. The network is an EDM DDPM++ U-Net (SongUNet) of a few million parameters at 16x16;
timing reads the run's own log (`seconds` at iterations `--skip` and `--iters`), so start-up and
the first iterations are left out. Rounds alternate the two layouts, so that a change in machine
load affects both.

    python benchmarks/sharding_speed.py --rounds 2 --out benchmarks/results/sharding-speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SONG = dict(
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
    model_channels=32,
    channel_mult=[1, 2, 2],
    num_blocks=2,
    attn_resolutions=[8],
    dropout=0.0,
)


def make_teacher(folder: Path) -> tuple[Path, int]:
    from disback_cli.models.denoiser_files import save_denoiser
    from disback_cli.models.networks import NetworkSpec, build_denoiser

    spec = NetworkSpec(
        arch="SongUNet", precond="edm", data_shape=(3, 16, 16), label_dim=0, arch_kwargs=SONG
    )
    torch.manual_seed(0)
    network = build_denoiser(spec)
    info = {"role": "teacher", "train_sigma": {"p_mean": -1.2, "p_std": 1.2}}
    path = folder / "teacher.safetensors"
    save_denoiser(path, network, spec, info)
    return path, sum(p.numel() for p in network.parameters())


def disback(args: list[str], cwd: Path, processes: int = 1) -> None:
    launcher = [sys.executable, "-m", "disback_cli"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "disback_cli",
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args[:3])} failed:\n{done.stderr[-2000:]}")


def seconds_per_iteration(run: Path, skip: int, iters: int) -> float:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    at = {line["iteration"]: line["seconds"] for line in lines}
    return (at[iters] - at[skip]) / (iters - skip)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="iterations left out at the start")
    parser.add_argument("--batch", type=int, default=8, help="per process")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="disback-sharding-"))
    teacher, params = make_teacher(work)
    common = ["--seed", "0", "--device", "cpu", "--dropout", "0", "--quiet"]
    disback(
        [
            "record",
            "--teacher",
            str(teacher),
            "--iters",
            "4",
            "--nodes",
            "2",
            "--batch",
            str(args.batch),
            "--out",
            "traj",
            *common,
        ],
        work,
    )
    results: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    for round_ in range(args.rounds):
        for layout in results:
            name = f"{layout}-{round_}"
            disback(
                [
                    "backtrack",
                    "-T",
                    "traj",
                    "--iters",
                    str(args.iters),
                    "--interval",
                    "10",
                    "--batch",
                    str(args.batch),
                    "--log-every",
                    "5",
                    "--save-every",
                    "0",
                    "--parallel",
                    layout,
                    "--name",
                    name,
                    *common,
                ],
                work,
                processes=2,
            )
            value = seconds_per_iteration(work / "traj/backtrack" / name, args.skip, args.iters)
            results[layout].append(value)
            print(f"round {round_ + 1}: {layout:>4} {value:.3f} s/iteration", flush=True)
    ratio = min(results["fsdp"]) / min(results["ddp"])
    summary = (
        f"SongUNet of {params / 1e6:.2f} M parameters at 3x16x16, 2 processes x batch "
        f"{args.batch}, iterations {args.skip + 1}-{args.iters}: ddp "
        f"{min(results['ddp']):.3f} s/iteration, fsdp {min(results['fsdp']):.3f} "
        f"(best of {args.rounds} rounds): fsdp takes {ratio:.2f}x the time"
    )
    print(summary)
    if args.out:
        record = {"parameters": params, "batch": args.batch, **vars(args), "seconds": results}
        record["out"] = str(args.out)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        rows = "\n".join(
            f"| {layout} | {' / '.join(f'{v:.3f}' for v in values)} |"
            for layout, values in results.items()
        )
        args.out.with_suffix(".md").write_text(
            f"{summary}\n\n| layout | s/iteration by round |\n|---|---|\n{rows}\n"
        )


if __name__ == "__main__":
    main()
