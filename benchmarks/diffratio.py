"""DiffRatio beside the score-difference losses, on the same budget and seeds, and best-of-K
sampling with its verifier.

For builtin:ring2d and builtin:digits (the settings of benchmarks/convergence.py), seeds 0-2:
plain VSD (`--no-trajectory`), DisBack with VSD, and DiffRatio (`--loss diffratio --data
builtin:NAME`), all from the same trajectory's G0 with the same generator rate and iterations.
DiffRatio runs at the defaults before issue #28 (one ratio step, VSD's weight), with each fix of
its high-noise problem alone (5 ratio steps per generator step; the score weighting), and at
today's defaults (both). Reported: final quality (median [min, max]),
wall-clock, for each DiffRatio arm the ratio network's logistic loss over the last quarter of
the run (against chance) and the share of the final update carried by draws above sigma 3, the
auxiliary network's parameters and training memory against the fake score's, and for the
DiffRatio generators at today's defaults the quality of samples chosen by the ratio network
(K = 1, 4, 16; importance resampling and argmax). Not part of the test suite (about 40
minutes on one CPU core):

    python benchmarks/diffratio.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import SETTINGS

from disback_cli.config import BacktrackConfig, RecordConfig, SampleConfig
from disback_cli.evaluation.ground_truth import digits_report, vector_report
from disback_cli.method.generator import load_generator
from disback_cli.method.losses import make_generator_loss
from disback_cli.method.ratio import score_difference
from disback_cli.models.conditioning import condition_source
from disback_cli.models.ratio import load_ratio
from disback_cli.models.teachers import generator_family, open_teacher
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.stages.sample import write_samples_of
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, read_manifest

ARMS = {  # name: (loss, no_trajectory, settings beyond the dataset's)
    "vsd (plain)": ("vsd", True, {}),
    "vsd (DisBack)": ("vsd", False, {}),
    "diffratio, 1 step, VSD weight": (
        "diffratio",
        True,
        {"fake_steps": 1, "ratio_weighting": "denoiser"},  # the defaults before issue #28
    ),
    "diffratio, 5 steps": ("diffratio", True, {"fake_steps": 5, "ratio_weighting": "denoiser"}),
    "diffratio, score weight": ("diffratio", True, {"fake_steps": 1, "ratio_weighting": "score"}),
    "diffratio, 5 steps + score weight (defaults)": ("diffratio", True, {}),
}
DEFAULT_RATIO_ARM = "diffratio, 5 steps + score weight (defaults)"  # best-of-K samples its runs
BEST_OF = (1, 4, 16)
RULES = ("resample", "argmax")
HIGH_SIGMA = 3.0  # the split: draws above it carry most of the squared update
CHANCE = 2 * math.log(2)  # the logistic loss (data term + generator term) of a coin
SAMPLES = {"ring2d": 2000, "digits": 797}


def training_bytes(module: torch.nn.Module) -> int:
    """Weights, gradient and two Adam moments, in float32."""
    return 4 * 4 * sum(p.numel() for p in module.parameters())


def best_of_k(trajectory: Path, name: str, dataset: str, work: Path) -> dict[str, dict]:
    """Quality of best-of-K samples of a diffratio run's EMA generator, by selection rule
    ("K" for plain sampling at K = 1, "rule K" otherwise)."""
    run = backtrack_dir(trajectory, name)
    manifest = read_manifest(run, BacktrackManifest)
    generator, info = load_generator(run / manifest.generator_ema.file, torch.device("cpu"))
    family = generator_family(info, torch.device("cpu"), True, None)
    ratio, _ = load_ratio(run / manifest.ratio.file, "cpu")
    verifier = (ratio, {"verifier": str(run / manifest.ratio.file)})
    results = {}
    for k in BEST_OF:
        for rule in RULES if k > 1 else RULES[:1]:
            out = work / f"{name}-{rule}-k{k}.npz"
            cfg = SampleConfig(n=SAMPLES[dataset], batch=500, format="npz", device="cpu", best_of=k)
            cfg = cfg.model_copy(update={"best_of_rule": rule})
            conditions = family.sample_conditions(generator.denoiser, cfg, "cpu")
            chosen = verifier if k > 1 else None
            write_samples_of(generator, info, cfg, conditions, out, verifier=chosen)
            with np.load(out) as data:
                if dataset == "ring2d":
                    report = vector_report([(torch.from_numpy(data["samples"]), {})], "ring2d")
                else:
                    report = digits_report([(data["images"], {})])
            numbers = report["results"][0].items()
            key = str(k) if k == 1 else f"{rule} {k}"
            results[key] = {m: v for m, v in numbers if isinstance(v, (int, float))}
    return results


@torch.no_grad()
def update_by_sigma(trajectory: Path, name: str, cfg: BacktrackConfig) -> dict:
    """Where the final generator's update comes from: the share of its squared norm carried by
    draws with sigma > HIGH_SIGMA (and the share of such draws), on 4096 fresh draws."""
    run = backtrack_dir(trajectory, name)
    manifest = read_manifest(run, BacktrackManifest)
    generator, _ = load_generator(run / manifest.generator.file, torch.device("cpu"))
    ratio, _ = load_ratio(run / manifest.ratio.file, "cpu")
    loss = make_generator_loss(manifest.config)
    rng = torch.Generator().manual_seed(0)
    shape = tuple(generator.denoiser.data_shape)
    z = torch.randn(4096, *shape, generator=rng)
    labels = condition_source(generator.denoiser.label_dim).draw(4096, rng, "cpu")
    x = generator(z, **labels)
    sigma = loss.sample_sigma(4096, rng, "cpu")
    x_t = x + sigma.reshape(-1, *[1] * len(shape)) * torch.randn(x.shape, generator=rng)
    gap = score_difference(ratio, x_t, sigma, labels)
    if manifest.config.ratio_weighting == "score":
        gap = gap * (ratio.spec.sigma_data**2 / sigma**2).reshape(-1, *[1] * len(shape))
    squared = gap.flatten(1).pow(2).sum(dim=1)
    high = sigma > HIGH_SIGMA
    return {
        "high_sigma_draws": high.float().mean().item(),
        "high_sigma_update_share": (squared[high].sum() / squared.sum()).item(),
    }


def run(dataset: str, seeds: list[int], work: Path) -> list[dict]:
    metric, _, record, backtrack = SETTINGS[dataset]
    rows = []
    for seed in seeds:
        trajectory = work / f"{dataset}-{seed}"
        started = time.perf_counter()
        run_record(RecordConfig(**record, seed=seed, device="cpu", threads=1), trajectory)
        record_seconds = time.perf_counter() - started
        for index, (arm, (loss, plain, extra)) in enumerate(ARMS.items()):
            settings = dict(backtrack)
            if loss == "diffratio":  # the ratio network at its own default rate (--lr-ratio)
                settings.pop("lr_fake")
                settings["data"] = f"builtin:{dataset}"
            cfg = BacktrackConfig(
                **{**settings, **extra},
                loss=loss,
                seed=seed,
                device="cpu",
                threads=1,
                no_trajectory=plain,
            )
            name = f"arm{index}"
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
                late = [ln["loss_fake"] for ln in lines if ln["iteration"] > 0.75 * cfg.iters]
                row["ratio_loss_late"] = statistics.mean(late)
                row.update(update_by_sigma(trajectory, name, cfg))
            if arm == DEFAULT_RATIO_ARM:
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
        f"| data | DiffRatio arm | ratio loss, last quarter (chance {CHANCE:.3f}) | "
        f"draws with sigma > {HIGH_SIGMA:g} | their share of the squared update |",
        "|---|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for arm in (a for a, (loss, _, _) in ARMS.items() if loss == "diffratio"):
            sel = [r for r in rows if (r["dataset"], r["arm"]) == (dataset, arm)]
            lines.append(
                f"| {dataset} | {arm} | {fmt([r['ratio_loss_late'] for r in sel])} | "
                f"{fmt([r['high_sigma_draws'] for r in sel])} | "
                f"{fmt([r['high_sigma_update_share'] for r in sel])} |"
            )
    lines += [
        "",
        f"| data | sampling (arm `{DEFAULT_RATIO_ARM}`) | metric of the samples | "
        "precision / classes |",
        "|---|---|---|---|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        metric = SETTINGS[dataset][0]
        second = "precision" if dataset == "ring2d" else "classes_covered"
        sel = [r for r in rows if (r["dataset"], r["arm"]) == (dataset, DEFAULT_RATIO_ARM)]
        for key in sel[0]["best_of"]:
            shown = "K = 1 (plain)" if key == "1" else f"{key.split()[0]}, K = {key.split()[1]}"
            lines.append(
                f"| {dataset} | {shown} | {fmt([r['best_of'][key][metric] for r in sel])} | "
                f"{fmt([r['best_of'][key][second] for r in sel])} |"
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
