"""What the path probe's chunk buys: CPU (or GPU) time per sample of a no-gradient forward of a
CIFAR-10-shaped DDPM++ network (EDM's class-conditional SongUNet, 56 M parameters, random
weights) at several chunk sizes, as `record` sends its probe through G0, the teacher and every
node. The probe holds 512 samples (`record --probe-samples`), so one node costs 512 forwards.

Chunks take turns over `--repeats` rounds, so that load from other processes reaches all of
them; the median per chunk is printed. CPU time (`time.process_time`) on the CPU, wall time
after a synchronize on CUDA. Not part of the test suite (about a minute on one CPU thread):

    OMP_NUM_THREADS=1 python benchmarks/probe_chunk.py --out benchmarks/results/probe-chunk.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import CIFAR10

from disback_cli.models.networks import build_denoiser


def seconds_per_sample(net, inputs, chunk: int, device: torch.device) -> float:
    x, sigma, labels = inputs
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    started = clock()
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            net(x[i : i + chunk], sigma[i : i + chunk], class_labels=labels[i : i + chunk])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - started) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=32, help="samples per measurement")
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build_denoiser(CIFAR10).eval().to(device)
    n = args.samples
    inputs = (
        torch.randn(n, 3, 32, 32, device=device),
        torch.rand(n, device=device) * 2 + 0.1,
        torch.nn.functional.one_hot(torch.randint(0, 10, (n,)), 10).float().to(device),
    )
    times: dict[int, list[float]] = {chunk: [] for chunk in args.chunks}
    seconds_per_sample(net, inputs, args.chunks[0], device)  # warm-up
    for _ in range(args.repeats):
        for chunk in args.chunks:
            times[chunk].append(seconds_per_sample(net, inputs, chunk, device))
    threads = torch.get_num_threads()
    print(f"{device}, {threads} thread(s); per sample of a no-gradient forward:")
    results = {}
    for chunk, values in times.items():
        median = statistics.median(values)
        results[chunk] = {"seconds_per_sample": values, "median": median}
        print(
            f"  chunk {chunk:4d}: {median * 1e3:7.1f} ms (512-sample probe, one network: "
            f"{512 * median:.0f} s)"
        )
    if args.out:
        report = {"device": str(device), "threads": threads, "samples": n, "results": results}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
