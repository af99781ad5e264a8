"""A smoke test of benchmarks/regimes.py (the measurements themselves live outside the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import checkout_env

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "regimes.py"


def test_regimes_runs_arms_resumes_and_reports(tmp_path):
    results = tmp_path / "regimes.jsonl"

    def regimes(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(SCRIPT), "--results", str(results), *args]
        return subprocess.run(command, env=checkout_env(), capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    run = ["run", "--dataset", "ring2d", "--arms", "base", "--seeds", "0", "--work",
           str(tmp_path / "work"), "--smoke"]  # fmt: skip
    first = regimes(*run)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("final") == 2  # DisBack and the baseline
    again = regimes(*run)  # resumable: finished runs are not run again
    assert again.returncode == 0 and "final" not in again.stdout
    assert len(results.read_text().splitlines()) == 2
    report = regimes("report")
    assert report.returncode == 0, report.stderr
    rows = [ln for ln in report.stdout.splitlines() if ln.startswith("| ring2d |")]
    assert [r.split("|")[2].strip() for r in rows] == ["base"]
    assert all(r.rstrip(" |").endswith(("helps", "hurts", "no difference")) for r in rows)
    assert (tmp_path / "regimes-ring2d-iteration.png").stat().st_size > 0
    assert (tmp_path / "regimes-mismatch.png").stat().st_size > 0
