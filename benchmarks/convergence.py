"""Does DisBack converge faster than the same distillation without the trajectory?

For builtin:ring2d and builtin:digits, each loss (vsd, dmd, sid), DisBack vs --no-trajectory,
3 seeds, the same generator-iteration budget and settings. vsd and sid share one trajectory per
seed; dmd gets its own, recorded at its noise levels (`record --loss dmd`). Writes raw curves
(JSON), a plot of median and range over seeds, and a markdown table: final metric, iterations to
reach the baseline's final quality (DisBack also charged with its recording iterations), wall time.
Not part of the test suite; about 30 minutes on 2 CPU cores:

    python benchmarks/convergence.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.method.losses import LOSS_TRAINING_SIGMA
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record

LOSSES = ("vsd", "dmd", "sid")
SETTINGS = {
    # metric, lower is better?, record settings, backtrack settings
    "ring2d": (
        "mmd2",
        True,
        dict(teacher="builtin:ring2d", iters=600, nodes=6, batch=256, lr=1e-4),
        dict(
            iters=1500,
            interval=100,
            batch=256,
            lr_g=1e-4,
            lr_fake=1e-3,
            eval_every=100,
            eval_samples=2000,
            log_every=50,
            save_every=0,
        ),
    ),
    "digits": (
        "fd_digits",
        True,
        dict(teacher="builtin:digits", iters=200, nodes=4, batch=64, lr=1e-4),
        dict(
            iters=250,
            interval=25,
            batch=32,
            lr_g=5e-5,
            lr_fake=1e-4,
            ema_rampup=0.3,
            eval_every=25,
            eval_samples=300,
            log_every=25,
            save_every=0,
        ),
    ),
}
EXTRA_METRICS = {
    "ring2d": ("precision", "modes_covered", "mode_tv"),
    "digits": ("classes_covered",),
}


def run(dataset: str, seeds: list[int], workdir: Path) -> list[dict]:
    metric, _, record, backtrack = SETTINGS[dataset]
    results = []
    for seed in seeds:
        recorded: dict[str, tuple[Path, float]] = {}  # one trajectory per noise-level kind
        for loss in LOSSES:
            kind = LOSS_TRAINING_SIGMA[loss]
            if kind not in recorded:
                trajectory = workdir / f"{dataset}-{seed}-{kind}"
                started = time.perf_counter()
                run_record(RecordConfig(**record, loss=loss, seed=seed, device="cpu"), trajectory)
                recorded[kind] = trajectory, time.perf_counter() - started
            trajectory, record_seconds = recorded[kind]
            for method in ("disback", "baseline"):
                cfg = BacktrackConfig(
                    **backtrack,
                    loss=loss,
                    seed=seed,
                    device="cpu",
                    no_trajectory=method == "baseline",
                )
                name = f"{loss}-{method}"
                manifest = run_backtrack(cfg, trajectory, name)
                lines = (trajectory / "backtrack" / name / "metrics.jsonl").read_text().splitlines()
                evals = {d["iteration"]: d["eval"] for d in map(json.loads, lines) if "eval" in d}
                results.append(
                    {
                        "dataset": dataset,
                        "loss": loss,
                        "method": method,
                        "seed": seed,
                        "seconds": manifest.elapsed_seconds,
                        "record_seconds": record_seconds,
                        "evals": evals,
                    }
                )
                final = evals[max(evals)][metric]
                print(
                    f"{dataset} seed {seed} {name}: final {metric} {final:.4g} "
                    f"({manifest.elapsed_seconds:.0f} s)",
                    flush=True,
                )
    return results


def select(results: list[dict], dataset: str, loss: str, method: str) -> list[dict]:
    return [r for r in results if (r["dataset"], r["loss"], r["method"]) == (dataset, loss, method)]


def median_curve(results: list[dict], key: str) -> dict[int, tuple[float, float, float]]:
    iterations = sorted(results[0]["evals"])
    curve = {}
    for it in iterations:
        values = [r["evals"][it][key] for r in results]
        curve[it] = (statistics.median(values), min(values), max(values))
    return curve


def first_reaching(curve: dict, target: float, lower_better: bool) -> int | None:
    for it, (median, _, _) in sorted(curve.items()):
        if (median <= target) if lower_better else (median >= target):
            return it
    return None


def table(results: list[dict]) -> str:
    rows = [
        "| data | loss | metric | DisBack final | baseline final | DisBack reaches baseline's"
        " final at (+ recording) | DisBack s (+ recording) | baseline s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset, (metric, lower, record, _) in SETTINGS.items():
        for loss in LOSSES:
            for key in (metric, *EXTRA_METRICS[dataset]):
                better_low = lower if key == metric else key in ("mode_tv",)
                sel = {m: select(results, dataset, loss, m) for m in ("disback", "baseline")}
                if not sel["disback"]:
                    continue
                curves = {m: median_curve(sel[m], key) for m in sel}
                final = {m: curves[m][max(curves[m])] for m in curves}
                reach = first_reaching(curves["disback"], final["baseline"][0], better_low)
                reach_text = (
                    "never"
                    if reach is None
                    else f"{reach} (+{record['iters']} = {reach + record['iters']})"
                )
                seconds = {m: statistics.median(r["seconds"] for r in sel[m]) for m in sel}
                rec = statistics.median(r["record_seconds"] for r in sel["disback"])
                fmt = lambda v: f"{v[0]:.3g} [{v[1]:.3g}, {v[2]:.3g}]"  # noqa: E731
                rows.append(
                    f"| {dataset} | {loss} | {key} | {fmt(final['disback'])} | "
                    f"{fmt(final['baseline'])} | {reach_text} | {seconds['disback']:.0f} "
                    f"(+{rec:.0f}) | {seconds['baseline']:.0f} |"
                )
    return "\n".join(rows)


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SETTINGS), figsize=(12, 4))
    for axis, (dataset, (metric, *_)) in zip(axes, SETTINGS.items(), strict=True):
        for loss, colour in zip(LOSSES, ("C0", "C1", "C2"), strict=True):
            for method, style in (("disback", "-"), ("baseline", "--")):
                sel = [
                    r
                    for r in results
                    if (r["dataset"], r["loss"], r["method"]) == (dataset, loss, method)
                ]
                if not sel:
                    continue
                curve = median_curve(sel, metric)
                xs = sorted(curve)
                axis.plot(
                    xs, [curve[x][0] for x in xs], style, color=colour, label=f"{loss} {method}"
                )
                axis.fill_between(
                    xs,
                    [curve[x][1] for x in xs],
                    [curve[x][2] for x in xs],
                    color=colour,
                    alpha=0.12,
                )
        axis.set(
            yscale="log",
            xlabel="generator iteration (recording not included)",
            ylabel=metric,
            title=f"{dataset}: median and range over seeds",
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = [r for d in args.datasets for r in run(d, args.seeds, Path(tmp))]
    (args.out / "convergence.json").write_text(json.dumps(results, indent=1))
    markdown = table(results)
    (args.out / "convergence.md").write_text(
        f"Output of `python benchmarks/convergence.py` (seeds {args.seeds}, "
        f"{time.perf_counter() - started:.0f} s on 2 CPU cores). Median [min, max] over seeds."
        f"\n\n{markdown}\n"
    )
    plot(results, args.out / "convergence.png")
    print(markdown)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
