"""A smoke test of benchmarks/regimes.py (the measurements themselves live outside the suite)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "regimes.py"


def load_script():
    spec = importlib.util.spec_from_file_location("regimes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regimes_runs_an_arm_resumes_and_reports(tmp_path):
    threads = torch.get_num_threads()  # the runs set one thread, as the script does
    try:
        check_the_script(tmp_path)
    finally:
        torch.set_num_threads(threads)


def check_the_script(tmp_path):
    regimes = load_script()
    results = tmp_path / "regimes.jsonl"

    def run() -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            regimes.run_arm("ring2d", "base", (0,), results, tmp_path / "work", smoke=True)
        return out.getvalue()

    assert run().count("final") == 2  # DisBack and the baseline
    assert run() == ""  # resumable: finished runs are not run again
    assert len(results.read_text().splitlines()) == 2
    rows = [ln for ln in regimes.report(results).splitlines() if ln.startswith("| ring2d |")]
    assert [r.split("|")[2].strip() for r in rows] == ["base"]
    assert rows[0].rstrip(" |").endswith("none yet (1 of 3 seeds)")  # no verdict on one seed
    vsd, others = regimes.lr_grid_table(regimes.load(results), "ring2d").split("\n\n")
    assert len(vsd.splitlines()) == 2 + len(regimes.LR_FACTORS_G)
    assert vsd.splitlines()[-1] == "| x10 | - | - | - |" and others.endswith("| x10 | - | - |")
    regimes.plot(results, tmp_path)
    assert (tmp_path / "regimes-ring2d-iteration.png").stat().st_size > 0
    assert (tmp_path / "regimes-mismatch.png").stat().st_size > 0
