"""CPU time of the answers a user waits for at the prompt (`--help`, `--version`, a mistyped
flag) against the CPU time of `python -c "import torch"` (issue #32: at most 0.3 of it).

Each command runs `--repeats` times in a fresh interpreter, the commands taking turns so that a
change in machine load reaches all of them; a run's CPU time is the user + system time of the
child (`resource.getrusage(RUSAGE_CHILDREN)`), which load on other cores changes far less than
wall time. Prints the median of each and its ratio to torch's, and writes them to `--out`.
Not part of the test suite (the suite checks that these commands import no torch at all):

    python benchmarks/cli_startup.py --out benchmarks/results/cli-startup.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DISBACK = [sys.executable, "-m", "disback_cli"]
COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "disback --help": [*DISBACK, "--help"],
    "disback --version": [*DISBACK, "--version"],
    "disback backtrack --help": [*DISBACK, "backtrack", "--help"],
    "disback backtrack --lr-gg 1e-4 (typo)": [*DISBACK, "backtrack", "--lr-gg", "1e-4"],
    "disback record (no --teacher)": [*DISBACK, "record"],
}


def cpu_seconds(command: list[str], cwd: str) -> float:
    """User + system CPU time of one run of `command` (its exit code is not ours to judge)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    with tempfile.TemporaryDirectory() as cwd:  # no recipe or run folder of ours nearby
        for command in COMMANDS.values():  # warm the file cache and the .pyc files
            cpu_seconds(command, cwd)
        for _ in range(args.repeats):
            for name, command in COMMANDS.items():
                times[name].append(cpu_seconds(command, cwd))
    torch_median = statistics.median(times["import torch"])
    results = {}
    print(f"{'command':<40} {'CPU s (median)':>14} {'vs import torch':>16}")
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {"cpu_seconds": values, "median": median, "ratio": median / torch_median}
        print(f"{name:<40} {median:>14.3f} {median / torch_median:>16.2f}")
    if args.out:
        report = {
            "repeats": args.repeats,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
