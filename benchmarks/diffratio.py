"""DiffRatio beside the score-difference losses, on the same budget and seeds, and best-of-K
sampling with its verifier.

For builtin:ring2d and builtin:digits (the settings of benchmarks/convergence.py), seeds 0-2:
plain VSD (`--no-trajectory`), DisBack with VSD, and DiffRatio (`--loss diffratio --data
builtin:NAME`), all from the same trajectory's G0 with the same generator rate and iterations.
Reported: final quality (median [min, max]), wall-clock, the auxiliary network's parameters and
training memory (weights, gradient, two Adam moments) against the fake score's, and for the
DiffRatio generators the quality of best-of-K samples (K = 1, 4, 16) picked by the ratio network.
Not part of the test suite (about 20 minutes on one CPU core):

    python benchmarks/diffratio.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import SETTINGS

from disback_cli.config import BacktrackConfig, RecordConfig, SampleConfig
from disback_cli.evaluation.ground_truth import digits_report, vector_report
from disback_cli.method.generator import load_generator
from disback_cli.models.ratio import load_ratio
from disback_cli.models.teachers import open_teacher
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.stages.sample import write_samples_of
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, read_manifest

ARMS = {  # name: (loss, no_trajectory)
    "vsd (plain)": ("vsd", True),
    "vsd (DisBack)": ("vsd", False),
    "diffratio": ("diffratio", True),
}
BEST_OF = (1, 4, 16)
SAMPLES = {"ring2d": 2000, "digits": 797}


def training_bytes(module: torch.nn.Module) -> int:
    """Weights, gradient and two Adam moments, in float32."""
    return 4 * 4 * sum(p.numel() for p in module.parameters())


def best_of_k(trajectory: Path, name: str, dataset: str, work: Path) -> dict[int, dict]:
    """Quality of best-of-K samples of a diffratio run's EMA generator."""
    run = backtrack_dir(trajectory, name)
    manifest = read_manifest(run, BacktrackManifest)
    generator, info = load_generator(run / manifest.generator_ema.file, torch.device("cpu"))
    ratio, _ = load_ratio(run / manifest.ratio.file, "cpu")
    verifier = (ratio, {"verifier": str(run / manifest.ratio.file)})
    results = {}
    for k in BEST_OF:
        out = work / f"{name}-k{k}.npz"
        cfg = SampleConfig(n=SAMPLES[dataset], batch=500, format="npz", device="cpu", best_of=k)
        write_samples_of(generator, info, cfg, out, verifier=verifier if k > 1 else None)
        import numpy as np

        with np.load(out) as data:
            if dataset == "ring2d":
                report = vector_report([(torch.from_numpy(data["samples"]), {})], "ring2d")
            else:
                report = digits_report([(data["images"], {})])
        results[k] = {
            key: v for key, v in report["results"][0].items() if isinstance(v, (int, float))
        }
    return results


def run(dataset: str, seeds: list[int], work: Path) -> list[dict]:
    metric, _, record, backtrack = SETTINGS[dataset]
    rows = []
    for seed in seeds:
        trajectory = work / f"{dataset}-{seed}"
        started = time.perf_counter()
        run_record(RecordConfig(**record, seed=seed, device="cpu", threads=1), trajectory)
        record_seconds = time.perf_counter() - started
        for arm, (loss, plain) in ARMS.items():
            settings = dict(backtrack)
            data = {}
            if loss == "diffratio":  # the ratio network at its own default rate (--lr-ratio)
                settings.pop("lr_fake")
                data = {"data": f"builtin:{dataset}"}
            cfg = BacktrackConfig(
                **settings,
                loss=loss,
                seed=seed,
                device="cpu",
                threads=1,
                no_trajectory=plain,
                **data,
            )
            name = f"{loss}-{'plain' if plain else 'disback'}"
            manifest = run_backtrack(cfg, trajectory, name)
            lines = [
                json.loads(x) for x in (backtrack_dir(trajectory, name) / "metrics.jsonl").open()
            ]
            evals = {ln["iteration"]: ln["eval"] for ln in lines if "eval" in ln}
            row = {
                "dataset": dataset,
                "arm": arm,
                "seed": seed,
                "seconds": manifest.elapsed_seconds,
                "record_seconds": record_seconds,
                "final": evals[max(evals)],
            }
            if loss == "diffratio":
                row["best_of"] = best_of_k(trajectory, name, dataset, work)
            rows.append(row)
            print(
                f"{dataset} seed {seed} {arm}: {metric} {row['final'][metric]:.4g} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    return rows


def sizes(dataset: str) -> dict:
    """Parameters and training memory of the fake score (a teacher copy) and the ratio network."""
    from disback_cli.models.ratio import build_ratio, ratio_spec_for

    teacher = open_teacher(f"builtin:{dataset}")
    spec = teacher.spec
    ratio = build_ratio(
        ratio_spec_for(spec.data_shape, spec.label_dim, teacher.denoiser.sigma_data, None, None)
    )
    networks = {"fake score": teacher.denoiser, "ratio network": ratio}
    return {
        name: {
            "parameters": sum(p.numel() for p in net.parameters()),
            "training_mb": training_bytes(net) / 2**20,
        }
        for name, net in networks.items()
    }


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def table(rows: list[dict]) -> str:
    lines = [
        "| data | method | final metric | precision / classes | seconds |",
        "|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        metric = SETTINGS[dataset][0]
        second = "precision" if dataset == "ring2d" else "classes_covered"
        for arm in ARMS:
            sel = [r for r in rows if (r["dataset"], r["arm"]) == (dataset, arm)]
            lines.append(
                f"| {dataset} | {arm} | {metric} {fmt([r['final'][metric] for r in sel])}"
                f" | {fmt([r['final'][second] for r in sel])} | "
                f"{fmt([r['seconds'] for r in sel])} |"
            )
    lines += [
        "",
        "| data | K | metric of the best-of-K samples | precision / classes |",
        "|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        metric = SETTINGS[dataset][0]
        second = "precision" if dataset == "ring2d" else "classes_covered"
        sel = [r for r in rows if (r["dataset"], r["arm"]) == (dataset, "diffratio")]
        for k in BEST_OF:
            lines.append(
                f"| {dataset} | {k} | {fmt([r['best_of'][k][metric] for r in sel])} | "
                f"{fmt([r['best_of'][k][second] for r in sel])} |"
            )
    lines += [
        "",
        "| data | network | parameters | training memory (weights, gradient, Adam) |",
        "|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for name, size in sizes(dataset).items():
            lines.append(
                f"| {dataset} | {name} | {size['parameters']:,} | {size['training_mb']:.2f} MiB |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["ring2d", "digits"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for d in args.datasets for r in run(d, args.seeds, Path(tmp))]
    (args.out / "diffratio.json").write_text(json.dumps(rows, indent=1))
    markdown = table(rows)
    (args.out / "diffratio.md").write_text(
        f"Output of `python benchmarks/diffratio.py` (seeds {args.seeds}, "
        f"{time.perf_counter() - started:.0f} s). Median [min, max] over seeds.\n\n{markdown}\n"
    )
    print(markdown)


if __name__ == "__main__":
    main()
