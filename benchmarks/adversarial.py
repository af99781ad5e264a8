"""The adversarial family beside plain score distillation, on the DisBack path and without it.

On builtin:digits and builtin:shapes (the settings of benchmarks/regimes.py, real data `--data
builtin:NAME`), seeds 0-2: DMD against DMD + DMD2's classifier head, SiD against SiDA, VSD
against f-distill (kl and js), each as DisBack and as the `--no-trajectory` baseline, at the
adversaries' default weights; for the plain losses also the baseline whose fake score starts at
node N (`--warm-fake`), which separates the path from a warm fake score. Reported: quality
against iterations and against seconds (DisBack and the warm baseline charged the recording),
final median [min, max] (number of seeds), and a verdict only where the seeds' ranges do not
overlap. `--collect WORK` adds the finished runs of an interrupted call from its `--work` folder.
Not part of the test suite (about an hour per data set on one CPU core):

    python benchmarks/adversarial.py --dataset digits --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import median_curve
from regimes import BASE as SETTINGS

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.evaluation.groups import range_verdict
from disback_cli.method.losses import LOSS_TRAINING_SIGMA
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record

LABELS = {"disback": "DisBack", "baseline": "no path", "warm": "no path, fake from node N"}
METHODS = {  # name: (no_trajectory, warm_fake, charged the recording)
    "disback": (False, False, True),
    "baseline": (True, False, False),
    "warm": (True, True, True),
}
ARMS = {  # name: (loss, settings beyond the dataset's), pairs of (without, with) the new term
    "dmd": ("dmd", {}),
    "dmd + head (DMD2)": ("dmd", {"adversary": "dmd2"}),
    # the head weighted up, to see whether it learns at all within this budget
    "dmd + head x100": ("dmd", {"adversary": "dmd2", "gan_weight_d": 1.0, "gan_weight_g": 0.3}),
    "sid": ("sid", {}),
    "sida": ("sid", {"adversary": "sida"}),
    "vsd": ("vsd", {}),
    "f-distill kl": ("vsd", {"adversary": "dmd2", "f_divergence": "kl"}),
    "f-distill js": ("vsd", {"adversary": "dmd2", "f_divergence": "js"}),
}
PAIRS = [
    ("dmd", "dmd + head (DMD2)"),
    ("dmd", "dmd + head x100"),
    ("sid", "sida"),
    ("vsd", "f-distill kl"),
    ("vsd", "f-distill js"),
]


def run(dataset: str, seeds: list[int], work: Path, arms: list[str], methods: list[str]):
    setting = SETTINGS[dataset]
    metric, record, backtrack = setting["metric"], setting["record"], setting["backtrack"]
    results = []
    for seed in seeds:
        recorded: dict[str, tuple[Path, float]] = {}
        for arm in arms:
            loss, extra = ARMS[arm]
            kind = LOSS_TRAINING_SIGMA[loss]
            if kind not in recorded:
                trajectory = work / f"{dataset}-{seed}-{kind}"
                manifest = run_record(
                    RecordConfig(**record, loss=loss, seed=seed, device="cpu"), trajectory
                )
                recorded[kind] = trajectory, manifest.elapsed_seconds
            trajectory, record_seconds = recorded[kind]
            data = {"data": f"builtin:{dataset}"} if "adversary" in extra else {}
            for method in methods:
                no_trajectory, warm_fake, charged = METHODS[method]
                if warm_fake and extra:  # the warm baseline is for the plain losses
                    continue
                cfg = BacktrackConfig(
                    **backtrack,
                    **extra,
                    **data,
                    loss=loss,
                    seed=seed,
                    device="cpu",
                    no_trajectory=no_trajectory,
                    warm_fake=warm_fake,
                )
                name = f"{slug(arm)}-{method}"
                manifest = run_backtrack(cfg, trajectory, name)
                evals = evals_of(trajectory / "backtrack" / name)
                results.append(
                    {
                        "dataset": dataset,
                        "arm": arm,
                        "method": method,
                        "seed": seed,
                        "seconds": manifest.elapsed_seconds,
                        "record_seconds": record_seconds if charged else 0.0,
                        "evals": evals,
                    }
                )
                final = evals[max(evals)][metric]
                print(f"{dataset} seed {seed} {arm} {method}: {metric} {final:.4g}", flush=True)
    return results


def slug(arm: str) -> str:
    return re.sub("[^A-Za-z0-9]+", "-", arm).strip("-")


def evals_of(run_dir: Path) -> dict[int, dict]:
    evals = {}
    for line in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "eval" in line:
            evals[line["iteration"]] = {**line["eval"], "seconds": line["seconds"]}
    return evals


def collect(dataset: str, work: Path) -> list[dict]:
    """The finished runs in the work folder of an interrupted run (`--collect`): every complete
    backtrack run of every recorded path, as `run` reports it."""
    arms = {slug(arm): arm for arm in ARMS}
    results = []
    for trajectory in sorted(work.glob(f"{dataset}-*-*")):
        seed = int(trajectory.name.split("-")[1])
        manifest_file = trajectory / "manifest.json"
        if not (manifest_file.exists() and (trajectory / "backtrack").is_dir()):
            continue  # interrupted while recording
        recorded = json.loads(manifest_file.read_text())
        for run_dir in sorted((trajectory / "backtrack").iterdir()):
            manifest = json.loads((run_dir / "manifest.json").read_text())
            name, _, method = run_dir.name.rpartition("-")
            if manifest["status"] != "complete" or name not in arms:
                continue
            charged = METHODS[method][2]
            results.append(
                {
                    "dataset": dataset,
                    "arm": arms[name],
                    "method": method,
                    "seed": seed,
                    "seconds": manifest["elapsed_seconds"],
                    "record_seconds": recorded["elapsed_seconds"] if charged else 0.0,
                    "evals": evals_of(run_dir),
                }
            )
    return results


def spread(values: list[float]) -> tuple[float, float, float, int]:
    """Median, min, max and the number of seeds."""
    return statistics.median(values), min(values), max(values), len(values)


def verdict(a: tuple, b: tuple, names: tuple[str, str]) -> str:
    """A verdict (`runs --baseline`'s rule, a distance: lower is better) only where the seeds'
    ranges, two seeds at least, do not overlap."""
    if min(a[3], b[3]) < 2:
        return "one seed: no verdict"
    found = range_verdict("distance", {"min": a[1], "max": a[2]}, {"min": b[1], "max": b[2]})
    if found is None:
        return "ranges overlap"
    return f"{names[0] if found == 'better' else names[1]} better"


def table(results: list[dict], metric: str) -> str:
    finals = {}
    for r in results:
        finals.setdefault((r["arm"], r["method"]), []).append(r["evals"][max(r["evals"])][metric])
    fmt = lambda v: f"{v[0]:.3g} [{v[1]:.3g}, {v[2]:.3g}] ({v[3]})"  # noqa: E731
    rows = [
        f"| without | with | method | {metric} without | {metric} with | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for without, with_ in PAIRS:
        for method in ("disback", "baseline"):
            a, b = finals.get((without, method)), finals.get((with_, method))
            if not (a and b):
                continue
            a, b = spread(a), spread(b)
            rows.append(
                f"| {without} | {with_} | {method} | {fmt(a)} | {fmt(b)} | "
                f"{verdict(a, b, (without, with_))} |"
            )
    rows += [
        "",
        f"| loss | DisBack {metric} | warm-fake baseline {metric} | verdict |",
        "|---|---|---|---|",
    ]
    for arm in ("dmd", "sid", "vsd"):
        a, b = finals.get((arm, "disback")), finals.get((arm, "warm"))
        if a and b:
            a, b = spread(a), spread(b)
            rows.append(f"| {arm} | {fmt(a)} | {fmt(b)} | {verdict(a, b, ('DisBack', 'warm'))} |")
    return "\n".join(rows)


def plot(results: list[dict], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {r["arm"] for r in results}
    pairs = [pair for pair in PAIRS if set(pair) <= ran]  # the pairs this run measured
    figure, axes = plt.subplots(2, len(pairs), figsize=(4 * len(pairs), 7), squeeze=False)
    for column, pair in enumerate(pairs):
        for arm, colour in zip(pair, ("C0", "C3"), strict=True):
            for method, style in (("disback", "-"), ("baseline", "--"), ("warm", ":")):
                sel = [r for r in results if (r["arm"], r["method"]) == (arm, method)]
                if not sel:
                    continue
                curve = median_curve(sel, metric)
                xs = sorted(curve)
                offset = statistics.median(r["record_seconds"] for r in sel)
                seconds = [
                    offset + statistics.median(r["evals"][x]["seconds"] for r in sel) for x in xs
                ]
                for axis, xvalues in ((axes[0][column], xs), (axes[1][column], seconds)):
                    axis.plot(
                        xvalues,
                        [curve[x][0] for x in xs],
                        style,
                        color=colour,
                        label=f"{arm} ({LABELS[method]})",
                    )
                    axis.fill_between(
                        xvalues,
                        [curve[x][1] for x in xs],
                        [curve[x][2] for x in xs],
                        color=colour,
                        alpha=0.1,
                    )
        axes[0][column].set(title=" vs ".join(pair), xlabel="generator iteration", ylabel=metric)
        axes[1][column].set(xlabel="seconds (DisBack, warm fake: + recording)", ylabel=metric)
        axes[0][column].legend(fontsize=7)
    figure.suptitle(f"{results[0]['dataset']}: median and range over seeds")
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "shapes"], default="digits")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: report")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier results")
    parser.add_argument(
        "--collect", type=Path, nargs="*", default=[], help="work folders of interrupted runs"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="adversarial-"))
    results = [  # JSON made the iterations strings
        {"dataset": args.dataset, **r, "evals": {int(k): v for k, v in r["evals"].items()}}
        for path in args.merge
        for r in json.loads(path.read_text())
    ]
    results += [r for folder in args.collect for r in collect(args.dataset, folder)]
    results += run(args.dataset, args.seeds, work, args.arms, args.methods)
    metric = SETTINGS[args.dataset]["metric"]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"adversarial-{args.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    text = table(results, metric)
    stem.with_suffix(".md").write_text(text + "\n")
    plot(results, metric, stem.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
