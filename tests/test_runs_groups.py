"""`disback runs --group-by` (issue 32, in part): a fixed folder of runs, two methods x two
losses x seeds, whose final metrics are set by hand; the means, spreads, differences against the
baseline and verdicts are checked against values computed by hand."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import run_cli
from disback_cli.config import BacktrackConfig
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.store.layout import backtrack_dir

# (loss, method, seed): final mmd2. dmd: DisBack 0.1, 0.3 vs baseline 0.5, 0.7 (ranges apart);
# vsd: DisBack 0.2, 0.6 vs baseline 0.4 (ranges overlap: no verdict).
FINALS = {
    ("dmd", "disback", 0): 0.1,
    ("dmd", "disback", 1): 0.3,
    ("dmd", "baseline", 0): 0.5,
    ("dmd", "baseline", 1): 0.7,
    ("vsd", "disback", 0): 0.2,
    ("vsd", "disback", 1): 0.6,
    ("vsd", "baseline", 0): 0.4,
}


@pytest.fixture(scope="module")
def sweep(small_trajectory, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    traj = root / "t"
    shutil.copytree(small_trajectory, traj)
    run_backtrack(BacktrackConfig(iters=4, interval=2, batch=16, device="cpu"), traj, "template")
    template = backtrack_dir(traj, "template")
    for (loss, method, seed), mmd2 in FINALS.items():
        run = backtrack_dir(traj, f"{loss}-{method}-{seed}")
        shutil.copytree(template, run)
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["name"] = run.name
        manifest["config"].update(loss=loss, seed=seed, no_trajectory=method == "baseline")
        (run / "manifest.json").write_text(json.dumps(manifest))
        line = {"iteration": 4, "loss_g": 0.0, "score_gap": 0.1, "eval": {"mmd2": mmd2}}
        (run / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    shutil.rmtree(template)
    return traj


def grouped(sweep, *args):
    result = run_cli("runs", sweep, "--group-by", "loss,method", *args)
    assert result.code == 0, result.stderr
    return result


def test_groups_have_the_hand_computed_means_spreads_and_verdicts(sweep):
    groups = json.loads(grouped(sweep, "--baseline", "method=baseline", "--json").stdout)
    by = {(g["group"]["loss"], g["group"]["method"]): g for g in groups}
    assert sorted(by) == [
        ("dmd", "baseline"),
        ("dmd", "disback"),
        ("vsd", "baseline"),
        ("vsd", "disback"),
    ]
    dmd = by["dmd", "disback"]["metrics"]["final_mmd2"]
    assert by["dmd", "disback"]["n"] == dmd["n"] == 2
    assert dmd["mean"] == pytest.approx(0.2) and dmd["min"] == 0.1 and dmd["max"] == 0.3
    assert dmd["std"] == pytest.approx(0.1414213562)  # sample std of 0.1, 0.3
    assert dmd["vs_baseline"] == pytest.approx(0.2 - 0.6) and dmd["verdict"] == "better"
    vsd = by["vsd", "disback"]["metrics"]["final_mmd2"]
    assert vsd["mean"] == pytest.approx(0.4) and vsd["vs_baseline"] == pytest.approx(0.0)
    assert vsd["verdict"] is None  # [0.2, 0.6] holds 0.4: no verdict
    baseline = by["vsd", "baseline"]["metrics"]["final_mmd2"]
    assert baseline["n"] == 1 and baseline["std"] is None and "vs_baseline" not in baseline


def test_the_table_and_csv_carry_the_same_numbers(sweep):
    text = grouped(sweep, "--baseline", "method=baseline").stdout
    assert "0.2 [0.1, 0.3]" in text and "-0.4 better" in text
    rows = grouped(sweep, "--csv").stdout.splitlines()
    header = rows[0].split(",")
    dmd = dict(
        zip(header, next(r for r in rows if r.startswith("dmd,disback")).split(","), strict=True)
    )
    assert float(dmd["final_mmd2_mean"]) == pytest.approx(0.2) and dmd["n"] == "2"


def test_grouping_mistakes_are_one_line(sweep):
    for args, phrase in (
        (["--group-by", "los"], "--group-by 'los': no such key"),
        (["--group-by", "loss", "--baseline", "method=baseline"], "one of the --group-by keys"),
        (["--baseline", "method=baseline"], "give --group-by too"),
    ):
        result = run_cli("runs", sweep, *args)
        assert result.code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert phrase in result.stderr


def test_where_compares_numbers_as_numbers_and_names_a_mistyped_key(sweep):
    rows = json.loads(run_cli("runs", sweep, "--where", "seed=1.0", "--json").stdout)
    assert len(rows) == 3 and {row["seed"] for row in rows} == {1}
    lr = json.loads(run_cli("runs", sweep, "--json").stdout)[0]["lr_g"]
    same = json.loads(run_cli("runs", sweep, "--where", f"lr_g={lr:.3e}", "--json").stdout)
    assert len(same) == len(FINALS)
    typo = run_cli("runs", sweep, "--where", "los=vsd")
    assert typo.code == 2 and typo.stderr.count("\n") == 1 and "did you mean 'loss'" in typo.stderr


def test_at_80_columns_no_number_or_run_name_is_cut(sweep):
    import subprocess
    import sys

    from conftest import checkout_env

    def shown(*args):
        return subprocess.run(
            [sys.executable, "-m", "disback_cli", "runs", str(sweep), *args],
            env=checkout_env(COLUMNS="80"),
            capture_output=True,
            text=True,
            check=True,
        )

    table = shown()
    lines = table.stdout.splitlines()
    assert "…" not in table.stdout and max(map(len, lines)) <= 80
    for loss, method, seed in FINALS:
        assert f"{loss}-{method}-{seed}" in table.stdout
    assert table.stderr.startswith("hidden to fit 80 columns: ")
    grouped = shown("--group-by", "loss,method", "--baseline", "method=baseline")
    assert "…" not in grouped.stdout and "0.2 [0.1, 0.3]" in grouped.stdout
    wide = shown("--wide")
    assert wide.stderr == "" and max(map(len, wide.stdout.splitlines())) > 80


def test_plot_draws_one_colour_per_group_with_its_band(sweep, tmp_path):
    result = run_cli(
        "plot", sweep, "--group-by", "loss,method", "--out", tmp_path / "c.png", "--json"
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["groups"] == {
        "loss=dmd, method=disback": 2,
        "loss=dmd, method=baseline": 2,
        "loss=vsd, method=disback": 2,
        "loss=vsd, method=baseline": 1,
    }
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    typo = run_cli("plot", sweep, "--group-by", "los", "--out", tmp_path / "d.png")
    assert (
        typo.code == 2 and "--group-by 'los'" in typo.stderr and not (tmp_path / "d.png").exists()
    )
