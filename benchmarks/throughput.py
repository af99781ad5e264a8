"""How much of `backtrack` and `sample` is useful network work, and what a target switch costs.

A fixed small SongUNet (3x16x16, random weights: throughput does not depend on what the weights
learned) is recorded into a 6-node trajectory, then:

1. Loop overhead: seconds per `backtrack` iteration (from metrics.jsonl, after warm-up) against
   the sum of its parts timed alone right after, with the same networks and batch: generator
   forward+backward, target and fake forward, fake forward+backward (on generator samples made
   without gradient). Optimiser steps and the EMA update are timed too and reported beside the
   ratio. Three such rounds; the median ratio and the range are reported.
2. Sampling: images/s of `disback sample` (npz and PNG) against a bare loop of batched forwards.
3. Target switch: how long the training thread waits when the target changes, as a share of
   one interval, with the background prefetch and with it switched off (synchronous loading);
   and the run time with 4 switches against the same run without any.

Not part of the test suite (a few minutes on 2 CPU cores):

    python benchmarks/throughput.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from disback_cli.config import BacktrackConfig, RecordConfig, SampleConfig
from disback_cli.method.dsm import denoising_step
from disback_cli.method.generator import OneStepGenerator, load_generator
from disback_cli.method.losses import make_generator_loss
from disback_cli.method.noise import TrainingSigma
from disback_cli.models import path_nodes
from disback_cli.models.conditioning import Unconditional
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.networks import NetworkSpec, build_denoiser
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.stages.sample import write_samples_of
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, read_manifest

SPEC = NetworkSpec(
    arch="SongUNet",
    data_shape=(3, 16, 16),
    arch_kwargs=dict(
        model_channels=32,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        dropout=0.0,
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    ),
)
BATCH = 16
WARMUP, MEASURED, REPEATS = 10, 60, 3


def make_teacher(folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / "songunet-16.safetensors"
    info = {"role": "teacher", "train_sigma": {"p_mean": -1.2, "p_std": 1.2}}
    save_denoiser(path, build_denoiser(SPEC), SPEC, info)
    return path


def logged_seconds(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["seconds"] for r in rows}


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def parts(trajectory: Path, cfg: BacktrackConfig) -> dict[str, float]:
    """The work of one backtrack iteration, each piece timed alone."""
    from disback_cli.models.denoiser_files import load_denoiser

    nodes = sorted((trajectory / "nodes").glob("*.safetensors"))
    target = load_denoiser(nodes[-2]).denoiser
    fake = copy.deepcopy(load_denoiser(nodes[-1]).denoiser).train().requires_grad_(True)
    g_net = copy.deepcopy(load_denoiser(nodes[0]).denoiser).train().requires_grad_(True)
    generator = OneStepGenerator(g_net, 2.5)
    loss_fn = make_generator_loss(cfg.model_copy(update={"p_mean": -1.2, "p_std": 1.2}))
    shape = (cfg.batch, *SPEC.data_shape)
    rng = torch.Generator().manual_seed(0)
    z, noise = torch.randn(shape), torch.randn(shape)
    sigma = loss_fn.sample_sigma(cfg.batch, rng, torch.device("cpu"))
    opt_g = torch.optim.Adam(g_net.parameters(), lr=1e-5, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-5, betas=(0.0, 0.999))

    def g_forward_backward():
        g_net.zero_grad(set_to_none=True)
        generator(z).sum().backward()

    with torch.no_grad():
        x_t = generator(z) + sigma.reshape(-1, 1, 1, 1) * noise

    def target_and_fake_forward():
        with torch.no_grad():
            fake(x_t, sigma)
            target(x_t, sigma)

    def fake_forward_backward():
        with torch.no_grad():
            x = generator(z)
        fake.zero_grad(set_to_none=True)
        ((fake(x + sigma.reshape(-1, 1, 1, 1) * noise, sigma) - x) ** 2).mean().backward()

    def optimiser_steps_and_ema():
        g_forward_backward()
        fake_forward_backward()
        start = time.perf_counter()
        opt_g.step()
        opt_f.step()
        with torch.no_grad():
            for p in g_net.parameters():
                p.lerp_(p, 0.999)
        return time.perf_counter() - start

    timings = {
        "generator forward+backward": timed(g_forward_backward, 30),
        "target and fake forward": timed(target_and_fake_forward, 30),
        "fake forward+backward": timed(fake_forward_backward, 30),
    }
    timings["optimiser steps and EMA"] = statistics.median(
        optimiser_steps_and_ema() for _ in range(20)
    )
    # denoising_step is what the loop calls for the fake score; time it whole as a cross-check
    timings["(denoising_step as called by the loop)"] = timed(
        lambda: denoising_step(
            fake, opt_f, generator, shape, Unconditional(), TrainingSigma("lognormal"), rng
        ),
        30,
    )
    return timings


def sampling(generator_file: Path, folder: Path, n: int, batch: int) -> dict[str, float]:
    generator, info = load_generator(generator_file, torch.device("cpu"))

    def bare():
        with torch.no_grad():
            for start in range(0, n, batch):
                generator(torch.randn(min(batch, n - start), *SPEC.data_shape))

    out: dict[str, float] = {"bare forward loop": n / timed(bare, 3)}
    for fmt in ("npz", "png"):
        cfg = SampleConfig(n=n, batch=batch, format=fmt, device="cpu")
        target = folder / f"samples-{fmt}" if fmt == "png" else folder / "samples.npz"
        out[f"disback sample ({fmt})"] = n / timed(
            lambda cfg=cfg, target=target: write_samples_of(generator, info, cfg, target), 3
        )
    return out


def switch_cost(trajectory: Path, interval: int, prefetch: bool) -> dict[str, float]:
    """Time the main thread waits in a target switch (the stall), and the whole run's time
    against a run without switches (what the background loading costs the training threads)."""
    waits: list[float] = []
    original = path_nodes.PathNodes.target

    def timed_target(self, index):
        start = time.perf_counter()
        node = original(self, index) if prefetch else self._prepare(index)
        waits.append(time.perf_counter() - start)
        return node

    iters = interval * 5
    path_nodes.PathNodes.target = timed_target
    try:
        name = f"switch-{'prefetch' if prefetch else 'sync'}"
        run_backtrack(
            BacktrackConfig(
                iters=iters, interval=interval, batch=BATCH, log_every=5, save_every=0, device="cpu"
            ),
            trajectory,
            name,
        )
    finally:
        path_nodes.PathNodes.target = original
    switching = logged_seconds(backtrack_dir(trajectory, name))[iters]
    stalls = waits[1:]  # the first target is loaded before training starts
    return {
        "switches": len(stalls),
        "median_stall_s": statistics.median(stalls),
        "max_stall_s": max(stalls),
        "stall_share_of_interval": statistics.median(stalls) / (switching / iters * interval),
        "run_s": switching,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "network": SPEC.model_dump(),
        "batch": BATCH,
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = make_teacher(tmp)
        trajectory = tmp / "t"
        run_record(
            RecordConfig(teacher=str(teacher), iters=12, nodes=6, batch=BATCH, device="cpu"),
            trajectory,
        )
        cfg = BacktrackConfig(
            iters=WARMUP + MEASURED,
            interval=10_000,
            batch=BATCH,
            log_every=5,
            save_every=0,
            device="cpu",
        )
        rounds = []
        for repeat in range(REPEATS):  # the machine's speed drifts: pair each loop with its parts
            run_backtrack(cfg, trajectory, f"loop{repeat}")
            times = logged_seconds(backtrack_dir(trajectory, f"loop{repeat}"))
            loop = (times[WARMUP + MEASURED] - times[WARMUP]) / MEASURED
            pieces = parts(trajectory, cfg)
            work = sum(
                pieces[k]
                for k in (
                    "generator forward+backward",
                    "target and fake forward",
                    "fake forward+backward",
                )
            )
            optimisers = pieces["optimiser steps and EMA"]
            rounds.append(
                {
                    "iteration_s": loop,
                    "parts_s": pieces,
                    "sum_of_parts_s": work,
                    "overhead_vs_parts": loop / work - 1,
                    "overhead_vs_parts_and_optimisers": loop / (work + optimisers) - 1,
                }
            )
        overheads = sorted(r["overhead_vs_parts"] for r in rounds)
        results["loop"] = {
            "rounds": rounds,
            "median_overhead_vs_parts": statistics.median(overheads),
            "overhead_range": [overheads[0], overheads[-1]],
            "median_overhead_vs_parts_and_optimisers": statistics.median(
                r["overhead_vs_parts_and_optimisers"] for r in rounds
            ),
        }
        run = backtrack_dir(trajectory, "loop0")
        manifest = read_manifest(run, BacktrackManifest)
        results["sampling_images_per_s"] = sampling(
            run / manifest.generator_ema.file, tmp, 512, 128
        )
        steady = BacktrackConfig(
            iters=100, interval=10_000, batch=BATCH, log_every=5, save_every=0, device="cpu"
        )
        run_backtrack(steady, trajectory, "no-switch")
        results["switch"] = {
            "prefetch": switch_cost(trajectory, 20, prefetch=True),
            "synchronous": switch_cost(trajectory, 20, prefetch=False),
            "no_switch_run_s": logged_seconds(backtrack_dir(trajectory, "no-switch"))[100],
        }
        node = sorted((trajectory / "nodes").glob("*.safetensors"))[0]
        results["node_file_mb"] = node.stat().st_size / 1e6
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
