"""Where does backtracking help? A regime map of DisBack against the same distillation without
the trajectory (`--no-trajectory`), arm by arm, on the built-in teachers.

An arm changes one thing of a data set's base setting (the initial generator, the switch rule,
the node count, the interval, the fake score's speed, the learning rates); for every seed both
methods start from the same recorded trajectory's G0 and get the same generator iterations.
Each finished run is appended to a JSON-lines file at once, so the script resumes where it was
stopped and can be run one arm at a time:

    python benchmarks/regimes.py run --dataset ring2d --arms base sigma80     # those arms
    python benchmarks/regimes.py run --dataset ring2d --arms all              # every arm not done
    python benchmarks/regimes.py report                                       # tables and plots

Results: benchmarks/results/regimes.jsonl; `report` writes regimes.md and the plots beside it.
Not part of the test suite (the ring's arms take about 30 minutes on one CPU core).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("disback", "baseline")
SEEDS = (0, 1, 2)

# Per data set: headline metric (lower is better?), the base recording and backtracking.
BASE = {
    "ring2d": dict(
        metric="mmd2",
        lower=True,
        record=dict(teacher="builtin:ring2d", iters=600, nodes=6, batch=256, lr=1e-4),
        backtrack=dict(
            iters=1500,
            interval=100,
            batch=256,
            lr_g=1e-4,
            lr_fake=1e-3,
            eval_every=100,
            eval_samples=2000,
            log_every=50,
            save_every=0,
            mismatch_every=100,
        ),
        narrow={"hidden": 32},
    ),
    "digits": dict(
        metric="fd_digits",
        lower=True,
        record=dict(teacher="builtin:digits", iters=200, nodes=4, batch=64, lr=1e-4),
        backtrack=dict(
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
        narrow={"model_channels": 12},
    ),
    "shapes": dict(
        metric="template_distance",
        lower=True,
        record=dict(teacher="builtin:shapes", iters=200, nodes=4, batch=32, lr=1e-4),
        backtrack=dict(
            iters=300,
            interval=25,
            batch=32,
            lr_g=5e-5,
            lr_fake=1e-4,
            ema_rampup=0.3,
            eval_every=25,
            eval_samples=400,
            log_every=25,
            save_every=0,
        ),
        narrow={"model_channels": 16},
    ),
}

# Arms: overrides of the base recording and backtracking ("narrow" takes the data set's kwargs).
ARMS = {
    "base": {},
    "sigma80": {"record": {"sigma_init": 80.0}},
    "random-student": {"record": {"student_arch_kwargs": {}}},
    "narrow-student": {"record": {"student_arch_kwargs": "narrow"}},
    # patience half the interval (the interval caps a node): 50 on the ring, the CLI's default
    "adaptive": {"backtrack": {"switch": "adaptive", "switch_patience": 0.5}},
    "distance": {"record": {"placement": "distance"}},
    "nodes2": {"record": {"nodes": 2}},
    "nodes4": {"record": {"nodes": 4}},
    "nodes8": {"record": {"nodes": 8}},
    "nodes16": {"record": {"nodes": 16}},
    "interval-half": {"backtrack": {"interval": 0.5}},
    "interval-double": {"backtrack": {"interval": 2.0}},
    "fake-steps5": {"backtrack": {"fake_steps": 5}},
    # the ring's best generator rate (x10), with the path walked in a fifth of the time
    "fast-g-short-interval": {"backtrack": {"lr_g": 10.0, "interval": 0.2}},
}
# The learning-rate grid around the base rates, the same for both methods (the generator's axis
# runs one step further: on the ring both methods' best sat at its x3 edge).
LR_FACTORS_G = (1 / 3, 1.0, 3.0, 10.0)
LR_FACTORS_FAKE = (1 / 3, 1.0, 3.0)
# The other score-difference losses, on the generator's axis only (the axis that mattered for
# VSD); each records its own path (dmd's nodes train at its Karras levels).
OTHER_LOSSES = ("dmd", "sid")


def lr_arm(g: float, f: float | None = None, loss: str = "vsd") -> str:
    """A learning-rate arm's name: VSD's grid points by both factors, other losses by lr_g's."""
    return f"lr-g{g:.2g}-f{f:.2g}" if loss == "vsd" else f"lr-{loss}-g{g:.2g}"


for _g in LR_FACTORS_G:
    for _f in LR_FACTORS_FAKE:
        ARMS[lr_arm(_g, _f)] = {"backtrack": {"lr_g": _g, "lr_fake": _f}}
for _loss in OTHER_LOSSES:
    for _g in LR_FACTORS_G:
        ARMS[lr_arm(_g, loss=_loss)] = {
            "record": {"loss": _loss},
            "backtrack": {"loss": _loss, "lr_g": _g},
        }


def grid_loss(arm: str) -> str | None:
    """The loss a learning-rate arm belongs to (None: not a learning-rate arm)."""
    if not arm.startswith("lr-"):
        return None
    part = arm.split("-")[1]
    return part if part in OTHER_LOSSES else "vsd"


def settings(dataset: str, arm: str, smoke: bool = False) -> tuple[dict, dict]:
    """The arm's record and backtrack settings on `dataset` (`smoke`: a few iterations, to
    check the script itself)."""
    base, change = BASE[dataset], ARMS[arm]
    record, backtrack = dict(base["record"]), dict(base["backtrack"])
    for key, value in change.get("record", {}).items():
        record[key] = base["narrow"] if value == "narrow" else value
    for key, value in change.get("backtrack", {}).items():
        if key in ("interval", "switch_patience"):  # factors of the base interval
            value = max(1, round(backtrack["interval"] * value))
        elif key in ("lr_g", "lr_fake"):
            value = backtrack[key] * value
        backtrack[key] = value
    if smoke:
        record.update(iters=4 * record["nodes"], batch=16)
        backtrack.update(
            iters=20,
            interval=max(1, backtrack["interval"] // 20),
            batch=16,
            eval_every=10,
            eval_samples=64,
            log_every=10,
        )
        if backtrack.get("mismatch_every"):
            backtrack["mismatch_every"] = 10
    if record["nodes"] > record["iters"]:
        record["iters"] = record["nodes"]
    return record, backtrack


def done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {(r["dataset"], r["arm"], r["seed"], r["method"]) for r in map(json.loads, path.open())}


def run_arm(
    dataset: str, arm: str, seeds: tuple[int, ...], out: Path, work: Path, smoke: bool = False
) -> None:
    finished = done(out)
    record, backtrack = settings(dataset, arm, smoke)
    for seed in seeds:
        if all((dataset, arm, seed, m) in finished for m in METHODS):
            continue
        key = hashlib.sha256(json.dumps([record, seed], sort_keys=True).encode()).hexdigest()
        trajectory = work / f"{dataset}-{key[:16]}"
        started = time.perf_counter()
        manifest = run_record(
            RecordConfig(**record, seed=seed, device="cpu", threads=1), trajectory
        )
        record_seconds = manifest.elapsed_seconds or time.perf_counter() - started
        for method in METHODS:
            if (dataset, arm, seed, method) in finished:
                continue
            cfg = BacktrackConfig(
                **backtrack, seed=seed, device="cpu", threads=1, no_trajectory=method == "baseline"
            )
            name = f"{arm}-{method}-{seed}"
            result = run_backtrack(cfg, trajectory, name, force=True)
            lines = [
                json.loads(x) for x in (trajectory / "backtrack" / name / "metrics.jsonl").open()
            ]
            entry = {
                "dataset": dataset,
                "arm": arm,
                "seed": seed,
                "method": method,
                "record_iters": record["iters"],
                "record_seconds": record_seconds,
                "seconds": result.elapsed_seconds,
                "evals": {
                    ln["iteration"]: {**ln["eval"], "seconds": ln["seconds"]}
                    for ln in lines
                    if "eval" in ln
                },
                "mismatch": {ln["iteration"]: ln["mismatch"] for ln in lines if "mismatch" in ln},
                "score_gap": {ln["iteration"]: ln["score_gap"] for ln in lines if "loss_g" in ln},
            }
            with out.open("a") as f:
                f.write(json.dumps(entry) + "\n")
            final = entry["evals"][max(entry["evals"])][BASE[dataset]["metric"]]
            print(
                f"{dataset} {arm} seed {seed} {method}: final {final:.4g} "
                f"({entry['seconds']:.0f} s + {record_seconds:.0f} s recording)",
                flush=True,
            )


# --- report ----------------------------------------------------------------------------------


def load(path: Path) -> list[dict]:
    runs = [json.loads(line) for line in path.open()] if path.exists() else []
    for r in runs:
        r["evals"] = {int(k): v for k, v in r["evals"].items()}
        r["mismatch"] = {int(k): v for k, v in r["mismatch"].items()}
    return runs


def select(runs: list[dict], dataset: str, arm: str, method: str) -> list[dict]:
    return [r for r in runs if (r["dataset"], r["arm"], r["method"]) == (dataset, arm, method)]


def median_curve(runs: list[dict], key: str) -> dict[int, tuple[float, float, float]]:
    """Median, min and max over seeds of `key` at every evaluated iteration."""
    iterations = sorted(set.intersection(*(set(r["evals"]) for r in runs)))
    curve = {}
    for it in iterations:
        values = [r["evals"][it][key] for r in runs]
        curve[it] = (statistics.median(values), min(values), max(values))
    return curve


def final(runs: list[dict], dataset: str) -> tuple[float, float, float]:
    """Median, min and max over seeds of the data set's metric at the last evaluation."""
    curve = median_curve(runs, BASE[dataset]["metric"])
    return curve[max(curve)]


def reaching(curve: dict, target: float, lower: bool) -> int | None:
    """The first evaluated iteration whose median is at least as good as `target`."""
    for it, (median, _, _) in sorted(curve.items()):
        if (median <= target) if lower else (median >= target):
            return it
    return None


def seconds_at(runs: list[dict], iteration: int) -> float:
    return statistics.median(r["evals"][iteration]["seconds"] for r in runs)


def compare(runs: list[dict], dataset: str, arm: str) -> dict | None:
    """DisBack against the baseline in one arm: final quality, and the iterations and seconds
    DisBack needs to reach the baseline's final quality, without and with its recording."""
    metric, lower = BASE[dataset]["metric"], BASE[dataset]["lower"]
    by = {m: select(runs, dataset, arm, m) for m in METHODS}
    if not all(by.values()):
        return None
    curves = {m: median_curve(by[m], metric) for m in METHODS}
    ends_at = {m: curves[m][max(curves[m])] for m in METHODS}
    target = ends_at["baseline"][0]
    base_at = reaching(curves["baseline"], target, lower)
    disback_at = reaching(curves["disback"], target, lower)
    record_iters = by["disback"][0]["record_iters"]
    record_seconds = statistics.median(r["record_seconds"] for r in by["disback"])
    row = {
        "dataset": dataset,
        "arm": arm,
        "metric": metric,
        "seeds": len(by["disback"]),
        "disback": ends_at["disback"],
        "baseline": ends_at["baseline"],
        "baseline_reaches": base_at,
        "disback_reaches": disback_at,
        "record_iters": record_iters,
        "record_seconds": record_seconds,
    }
    # Both methods run the same loop, so an iteration costs the same: seconds are charged at
    # the baseline's seconds per iteration (measured wall times on a shared machine are noisier
    # than the difference they would show), plus the recording's own measured seconds.
    per_iteration = seconds_at(by["baseline"], max(curves["baseline"])) / max(curves["baseline"])
    if disback_at is not None:
        row["speedup"] = base_at / disback_at
        row["speedup_charged"] = base_at / (disback_at + record_iters)
        row["speedup_seconds_charged"] = (
            base_at * per_iteration / (disback_at * per_iteration + record_seconds)
        )
    half = min(curves["baseline"], key=lambda i: abs(i - max(curves["baseline"]) / 2))
    early = reaching(curves["disback"], curves["baseline"][half][0], lower)
    row["speedup_half"] = None if early is None else half / early
    d, b = ends_at["disback"], ends_at["baseline"]
    better = (d[2] < b[1]) if lower else (d[1] > b[2])  # every seed of one beats every other
    worse = (d[1] > b[2]) if lower else (d[2] < b[1])
    row["verdict"] = "helps" if better else "hurts" if worse else "no difference"
    if row["seeds"] < len(SEEDS):  # a range over fewer seeds separates too easily
        row["verdict"] = f"none yet ({row['seeds']} of {len(SEEDS)} seeds)"
    return row


def best_of_grid(
    runs: list[dict], dataset: str, method: str, loss: str = "vsd"
) -> tuple[str, tuple] | None:
    """The learning-rate arm of `loss` where `method` ends best (median over seeds)."""
    lower = BASE[dataset]["lower"]
    scores = {}
    for arm in (a for a in ARMS if grid_loss(a) == loss):
        sel = select(runs, dataset, arm, method)
        if sel:
            scores[arm] = final(sel, dataset)
    if not scores:
        return None
    arm = (min if lower else max)(scores, key=lambda a: scores[a][0])
    return arm, scores[arm]


def ends(runs: list[dict], key: str) -> str:
    """A mismatch quantity's median over seeds at the first and the last measurement."""
    its = sorted(set.intersection(*(set(r["mismatch"]) for r in runs)))
    first, last = (
        statistics.median(r["mismatch"][i][key] for r in runs) for i in (its[0], its[-1])
    )
    return f"{first:.3g} -> {last:.3g} (iterations {its[0]}, {its[-1]})"


def mismatch_table(runs: list[dict]) -> str:
    """Per ring arm: the baseline's target (the teacher) error at the generator's samples, and
    the update's alignment with the exact KL direction for both methods, first and last."""
    lines = [
        "| arm | teacher error at G's samples (baseline), first -> last | update cosine,"
        " DisBack: first -> last | update cosine, baseline: first -> last |",
        "|---|---|---|---|",
    ]
    for arm in ARMS:
        sel = {m: [r for r in select(runs, "ring2d", arm, m) if r["mismatch"]] for m in METHODS}
        if not all(sel.values()):
            continue

        cells = [
            ends(sel["baseline"], "target_mse"),
            ends(sel["disback"], "cosine"),
            ends(sel["baseline"], "cosine"),
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_grid_table(runs: list[dict], dataset: str) -> str:
    """Final quality (median over seeds) of both methods at every point of the learning-rate
    grids, cells DisBack / baseline: VSD's (rows the generator's factor, columns the fake
    score's), then the other losses' (rows the generator's factor, columns the loss)."""

    def cell(arm: str) -> str:
        by = {m: select(runs, dataset, arm, m) for m in METHODS}
        if not all(by.values()):
            return "-"
        return " / ".join(f"{final(by[m], dataset)[0]:.3g}" for m in METHODS)

    def table(title: str, columns: list[str], arm) -> list[str]:
        lines = [
            f"| {dataset}: {title} | " + " | ".join(columns) + " |",
            "|---" * (1 + len(columns)) + "|",
        ]
        for g in LR_FACTORS_G:
            cells = [cell(arm(g, c)) for c in range(len(columns))]
            lines.append(f"| x{g:.2g} | " + " | ".join(cells) + " |")
        return lines

    vsd = table(
        "lr_g factor \\ lr_fake factor",
        [f"x{f:.2g}" for f in LR_FACTORS_FAKE],
        lambda g, c: lr_arm(g, LR_FACTORS_FAKE[c]),
    )
    others = table(
        "lr_g factor (lr_fake x1)", list(OTHER_LOSSES), lambda g, c: lr_arm(g, loss=OTHER_LOSSES[c])
    )
    return "\n".join([*vsd, "", *others])


def fmt(v: tuple) -> str:
    return f"{v[0]:.3g} [{v[1]:.3g}, {v[2]:.3g}]"


def report(path: Path) -> str:
    runs = load(path)
    lines = [
        "| data | arm | metric | DisBack | baseline | DisBack reaches the baseline's final at"
        " (baseline at) | speed-up to the baseline's final: iterations / + recording /"
        " seconds + recording | speed-up to its half-budget quality | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in BASE:
        for arm in ARMS:
            if arm.startswith("lr-"):
                continue
            row = compare(runs, dataset, arm)
            if row is None:
                continue
            reach = (
                "never"
                if row["disback_reaches"] is None
                else f"{row['disback_reaches']} ({row['baseline_reaches']})"
            )
            speed = (
                "-"
                if "speedup" not in row
                else f"{row['speedup']:.2f} / {row['speedup_charged']:.2f} / "
                f"{row['speedup_seconds_charged']:.2f}"
            )
            half = "never" if row["speedup_half"] is None else f"{row['speedup_half']:.2f}"
            cells = (
                dataset,
                arm,
                row["metric"],
                fmt(row["disback"]),
                fmt(row["baseline"]),
                reach,
                speed,
                half,
                row["verdict"],
            )
            lines.append("| " + " | ".join(cells) + " |")
        for loss in ("vsd", *OTHER_LOSSES):
            grid = {m: best_of_grid(runs, dataset, m, loss) for m in METHODS}
            if all(grid.values()):
                lines.append(
                    f"| {dataset} | {loss}: learning rates, best of grid each | "
                    f"{BASE[dataset]['metric']} | {fmt(grid['disback'][1])} "
                    f"({grid['disback'][0]}) | {fmt(grid['baseline'][1])} "
                    f"({grid['baseline'][0]}) | | | | |"
                )
    return "\n".join(lines)


def plot(path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load(path)
    arms = [a for a in ARMS if not a.startswith("lr-")]
    for dataset in BASE:
        present = [a for a in arms if compare(runs, dataset, a) is not None]
        if not present:
            continue
        metric = BASE[dataset]["metric"]
        cols = min(4, len(present))
        rows = -(-len(present) // cols)
        for axis_kind in ("iteration", "seconds"):
            figure, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
            for axis, arm in zip(axes.flat, present, strict=False):
                for method, style in (("disback", "C0-"), ("baseline", "C1--")):
                    sel = select(runs, dataset, arm, method)
                    curve = median_curve(sel, metric)
                    xs = sorted(curve)
                    if axis_kind == "seconds":
                        shift = (
                            statistics.median(r["record_seconds"] for r in sel)
                            if method == "disback"
                            else 0.0
                        )
                        x = [seconds_at(sel, i) + shift for i in xs]
                    else:
                        x = xs
                    axis.plot(x, [curve[i][0] for i in xs], style, label=method)
                    axis.fill_between(
                        x,
                        [curve[i][1] for i in xs],
                        [curve[i][2] for i in xs],
                        color=style[:2],
                        alpha=0.15,
                    )
                axis.set(
                    title=f"{dataset}: {arm}",
                    yscale="log",
                    ylabel=metric,
                    xlabel="generator iteration"
                    if axis_kind == "iteration"
                    else "seconds (DisBack: recording included)",
                )
                axis.grid(alpha=0.3)
                axis.legend(fontsize=7)
            for axis in list(axes.flat)[len(present) :]:
                axis.axis("off")
            figure.tight_layout()
            figure.savefig(out / f"regimes-{dataset}-{axis_kind}.png", dpi=90)
            plt.close(figure)
    plot_mismatch(runs, out)


def plot_mismatch(runs: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    sel = {m: [r for r in select(runs, "ring2d", "base", m) if r["mismatch"]] for m in METHODS}
    if not all(sel.values()):
        return
    keys = ("target_mse", "fake_mse", "true_gap", "cosine")
    figure, axes = plt.subplots(1, len(keys), figsize=(16, 3.4))
    for axis, key in zip(axes, keys, strict=True):
        for method, style in (("disback", "C0-"), ("baseline", "C1--")):
            its = sorted(set.intersection(*(set(r["mismatch"]) for r in sel[method])))
            med = [statistics.median(r["mismatch"][i][key] for r in sel[method]) for i in its]
            lo = [min(r["mismatch"][i][key] for r in sel[method]) for i in its]
            hi = [max(r["mismatch"][i][key] for r in sel[method]) for i in its]
            axis.plot(its, med, style, label=method)
            axis.fill_between(its, lo, hi, color=style[:2], alpha=0.15)
        axis.set(
            title=f"ring2d base: {key}",
            xlabel="generator iteration",
            yscale="linear" if key == "cosine" else "log",
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "regimes-mismatch.png", dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run")
    runner.add_argument("--dataset", choices=sorted(BASE), required=True)
    runner.add_argument("--arms", nargs="+", default=["base"], help="arm names, or all")
    runner.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    runner.add_argument("--work", type=Path, default=Path("runs/regimes"))
    runner.add_argument("--smoke", action="store_true", help="a few iterations (a script check)")
    sub.add_parser("report")
    parser.add_argument("--results", type=Path, default=RESULTS / "regimes.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "run":
        arms = list(ARMS) if args.arms == ["all"] else args.arms
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            parser.error(f"unknown arms {unknown} (known: {', '.join(ARMS)})")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for arm in arms:
            run_arm(args.dataset, arm, tuple(args.seeds), args.results, args.work, args.smoke)
        return
    runs = load(args.results)
    markdown = "\n\n".join(
        [report(args.results), mismatch_table(runs), lr_grid_table(runs, "ring2d")]
    )
    (args.results.parent / "regimes.md").write_text(markdown + "\n")
    plot(args.results, args.results.parent)
    print(markdown)


if __name__ == "__main__":
    main()
