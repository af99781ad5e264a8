"""Metric curves of DisBack vs the --no-trajectory baseline on builtin:ring2d (recipe settings).

Runs `recipes/ring2d.toml` for several seeds, reads the exact-ground-truth metrics that
`backtrack --eval-every` logs, and prints a markdown table of median [min, max] over seeds.
Not part of the test suite: about 45 s per seed on 2 CPU cores.

    python benchmarks/ring2d_curves.py --seeds 0 1 2 --json benchmarks/results/ring2d_curves.json
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
from disback_cli.config.recipes import read_recipe
from disback_cli.evaluation.ground_truth import training_evaluator
from disback_cli.method.generator import build_g0
from disback_cli.models.conditioning import Unconditional
from disback_cli.models.teachers import open_teacher
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.manifests import G0Spec

RECIPE = Path(__file__).parent.parent / "recipes" / "ring2d.toml"
METRICS = ("mmd2", "sliced_w2", "precision", "modes_covered", "mode_tv")


def run_seed(seed: int, workdir: Path, g0_metrics: dict) -> dict:
    record_cfg = RecordConfig(**{**read_recipe(RECIPE, "record"), "seed": seed, "device": "cpu"})
    started = time.perf_counter()
    run_record(record_cfg, workdir / f"seed{seed}")
    record_seconds = time.perf_counter() - started
    curves = {}
    for method, no_trajectory in (("disback", False), ("baseline", True)):
        values = {**read_recipe(RECIPE, "backtrack"), "seed": seed, "device": "cpu"}
        cfg = BacktrackConfig(**values, no_trajectory=no_trajectory)
        manifest = run_backtrack(cfg, workdir / f"seed{seed}", method)
        lines = (workdir / f"seed{seed}" / "backtrack" / method / "metrics.jsonl").read_text()
        evals = {0: g0_metrics}
        evals.update(
            {d["iteration"]: d["eval"] for d in map(json.loads, lines.splitlines()) if "eval" in d}
        )
        curves[method] = {"seconds": manifest.elapsed_seconds, "evals": evals}
    return {"seed": seed, "record_seconds": record_seconds, **curves}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def table(results: list[dict], metric: str) -> str:
    iterations = sorted(results[0]["disback"]["evals"])
    rows = [f"| iteration | DisBack {metric} | baseline {metric} |", "|---|---|---|"]
    for it in iterations:
        cells = [
            spread([r[m]["evals"][it][metric] for r in results]) for m in ("disback", "baseline")
        ]
        rows.append(f"| {it} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="write all curves to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    teacher = open_teacher("builtin:ring2d")
    evaluator = training_evaluator("ring2d", 2000, (2,), Unconditional(), torch.device("cpu"), 2000)
    g0_metrics = evaluator(build_g0(G0Spec(sigma_init=2.5), teacher, "cpu")[0])
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_seed(seed, Path(tmp), g0_metrics) for seed in args.seeds]
    for metric in METRICS:
        print(f"\n### {metric} (median [min, max] over seeds {args.seeds})\n")
        print(table(results, metric))
    for method in ("disback", "baseline"):
        seconds = [r[method]["seconds"] for r in results]
        print(f"\n{method}: {spread(seconds)} s for the backtrack stage (with evaluations)")
    print(f"record: {spread([r['record_seconds'] for r in results])} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
