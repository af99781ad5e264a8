"""How many intra-op threads should a CPU run use? Times `record` and `backtrack` iterations of
the built-in teachers at each thread count, on a quiet machine and beside a busy one (a process
spinning numpy matrix products on every core), and prints seconds per 100 iterations.

    python benchmarks/threads.py                      # results in benchmarks/results/threads.json

Each measurement runs in a fresh process (`disback record` / `backtrack` with `--threads N`), so
thread pools do not carry over; the time is the loop's own (the manifest's `elapsed_seconds`),
without process start-up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # teacher, record batch, backtrack batch
    "ring2d": ("builtin:ring2d", 256, 256),
    "digits": ("builtin:digits", 64, 64),
}


def burn(stop: multiprocessing.Event) -> None:
    import numpy as np

    a = np.random.default_rng(0).standard_normal((400, 400))
    while not stop.is_set():
        a = np.tanh(a @ a.T / 400)


def elapsed(args: list[str], env: dict) -> float:
    """Seconds of the training loop alone (the manifest's elapsed_seconds: no start-up)."""
    out = subprocess.run(
        [sys.executable, "-m", "disback_cli", *args, "--json"],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)["elapsed_seconds"]


def measure(case: str, threads: int, work: Path, env: dict, iters: int) -> dict:
    teacher, record_batch, backtrack_batch = CASES[case]
    out = work / f"{case}-{threads}"
    shutil.rmtree(out, ignore_errors=True)
    common = ["--device", "cpu", "--threads", str(threads)]
    record = elapsed(
        [
            "record",
            "--teacher",
            teacher,
            "--out",
            str(out),
            "--iters",
            str(iters),
            "--nodes",
            "2",
            "--batch",
            str(record_batch),
            *common,
        ],
        env,
    )
    backtrack = elapsed(
        [
            "backtrack",
            "-T",
            str(out),
            "--iters",
            str(iters),
            "--batch",
            str(backtrack_batch),
            "--save-every",
            "0",
            *common,
        ],
        env,
    )
    return {
        "case": case,
        "threads": threads,
        "record_s_per_100": record * 100 / iters,
        "backtrack_s_per_100": backtrack * 100 / iters,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    cores = len(os.sched_getaffinity(0))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("quiet", "busy"):
            stop = multiprocessing.Event()
            burners = [
                multiprocessing.Process(target=burn, args=(stop,))
                for _ in range(cores if load == "busy" else 0)
            ]
            for b in burners:
                b.start()
            try:
                for case in CASES:
                    for threads in sorted({1, cores}):
                        row = {"load": load, **measure(case, threads, Path(tmp), env, args.iters)}
                        print(json.dumps(row), flush=True)
                        results.append(row)
            finally:
                stop.set()
                for b in burners:
                    b.join()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(
        json.dumps({"cores": cores, "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
