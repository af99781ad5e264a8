"""A researcher's first hour and their sweeps (issue 16), at the command line: nothing silently
ignored, one exit-code rule, --json with the resolved config and absolute paths, --set, the
`runs` table, plots that label and mark what happened, threads, trackers."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from disback_cli.config import SampleConfig
from disback_cli.evaluation.catalog import unique_labels
from disback_cli.evaluation.plot import switch_iterations
from disback_cli.runtime.parallel import cpu_threads, execution
from disback_cli.store.metrics_log import read_metrics

BACKTRACK = [
    "--iters",
    "40",
    "--interval",
    "10",
    "--batch",
    "64",
    "--save-every",
    "20",
    "--log-every",
    "10",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, small_trajectory, cli_module) -> Path:
    """Two trajectories (copies of one, so two `default` runs exist), each with a DisBack run and
    a baseline, evaluated every 20 iterations."""
    root = tmp_path_factory.mktemp("sweep")
    for seed in ("s0", "s1"):
        shutil.copytree(small_trajectory, root / seed)
        for extra in ([], ["--no-trajectory", "--name", "baseline"]):
            result = cli_module(
                "backtrack",
                "-T",
                root / seed,
                *BACKTRACK,
                "--eval-every",
                "20",
                "--set",
                "eval_samples=300",
                "--seed",
                seed[1],
                *extra,
            )
            assert result.code == 0, result.stderr
    return root


# --- exit codes: 2 for what the command line itself gets wrong, 1 for inputs and failures ----

EXIT_CASES = [
    (["record", "--teacher", "builtin:ring2d", "--nodes", "0"], 2),
    (["record", "--teacher", "missing.pkl"], 1),
    (["backtrack", "-T", "t", "--interval", "0"], 2),
    (["backtrack", "-T", "nowhere"], 1),
    (["sample", "-T", "t", "--seeds", "5-3"], 2),
    (["sample", "-T", "nowhere"], 1),
    (["evaluate", "s.npz", "--dataset", "cifar"], 2),
    (["evaluate", "missing.npz"], 1),
    (["plot", "t/backtrack/default", "--metric", "nope"], 2),
    (["plot", "nowhere"], 1),
    (["runs", "t", "--sort", "nope"], 2),
    (["runs", "nowhere"], 1),
    (["teacher", "train", "--dataset", "ring2d", "--iters", "0", "--out", "x.safetensors"], 2),
    (["teacher", "inspect", "missing.pkl"], 1),
    (["demo", "--device", "tpu", "--out", "d"], 2),
    (["doctor", "--skip", "nope"], 2),
    (["record", "--teacher", "builtin:ring2d", "--no-such-flag"], 2),
]


@pytest.mark.parametrize("args, code", EXIT_CASES, ids=[" ".join(a[:3]) for a, _ in EXIT_CASES])
def test_one_exit_code_rule_for_every_command(
    args, code, cli, tmp_path, small_trajectory, monkeypatch
):
    shutil.copytree(small_trajectory, tmp_path / "t")
    result = cli("backtrack", "-T", tmp_path / "t", *BACKTRACK, "--iters", "20")
    assert result.code == 0, result.stderr
    np.savez(tmp_path / "s.npz", samples=np.zeros((4, 2), np.float32))
    monkeypatch.chdir(tmp_path)
    result = cli(*args)
    assert result.code == code, result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


# --- JSON summaries -------------------------------------------------------------------------


def test_json_summaries_carry_the_resolved_config_absolute_paths_and_say_when_nothing_ran(
    cli, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    record = [
        "record",
        "--teacher",
        "builtin:ring2d",
        "--out",
        "t",
        "--iters",
        "20",
        "--nodes",
        "2",
        "--batch",
        "32",
        "--device",
        "cpu",
        "--json",
    ]
    first = json.loads(cli(*record).stdout)
    assert first["noop"] is False and first["iterations_run"] == 20
    assert Path(first["trajectory"]).is_absolute() and first["trajectory"] == str(tmp_path / "t")
    assert all(Path(n["file"]).is_file() for n in first["nodes"] if n["file"])
    assert first["config"]["lr"] == 1e-4 and first["config_sources"]["lr"].startswith("default")
    again = json.loads(cli(*record).stdout)
    assert again["noop"] is True and again["iterations_run"] == 0

    backtrack = ["backtrack", "-T", "t", *BACKTRACK, "--loss", "sid", "--json"]
    run = json.loads(cli(*backtrack).stdout)
    config = run["config"]
    assert (config["loss"], config["interval"], config["no_trajectory"], config["seed"]) == (
        "sid",
        10,
        False,
        0,
    )
    assert run["noop"] is False and run["iterations_run"] == 40
    for key in ("run", "trajectory", "generator", "generator_ema", "metrics"):
        assert Path(run[key]).is_absolute() and Path(run[key]).exists(), key
    assert json.loads(cli(*backtrack).stdout)["noop"] is True

    sample = json.loads(cli("sample", "-T", "t", "-n", "50", "--json").stdout)
    assert Path(sample["out"]).is_absolute() and Path(sample["generator"]).is_absolute()
    assert sample["config"]["n"] == 50 and sample["samples_per_second"] > 0


def test_every_kind_of_evaluate_report_has_one_layout(cli, tmp_path, sweep):
    layout = {
        "kind",
        "metric",
        "key",
        "dataset",
        "detector",
        "reference",
        "samples",
        "repeats",
        "results",
        "summary",
        "floor",
    }
    run = sweep / "s0"
    assert cli("sample", "-T", run, "-n", "400", "--out", tmp_path / "s.npz").code == 0
    vector = json.loads(cli("evaluate", tmp_path / "s.npz", "--repeats", "2", "--json").stdout)
    assert set(vector) >= layout and vector["kind"] == "vector" and vector["repeats"] == 2
    assert [r["samples"] for r in vector["results"]] == [[0, 199], [200, 399]]
    assert vector["summary"]["mmd2"]["min"] == min(r["mmd2"] for r in vector["results"])
    assert vector["floor"]["n"] == 200 and vector["samples"]["source"] == str(tmp_path / "s.npz")

    # --ref on vector samples compares with those samples (no floor, modes from the data set)
    assert cli("sample", "-T", run, "--seeds", "1000-1399", "--out", tmp_path / "r.npz").code == 0
    against = json.loads(
        cli("evaluate", tmp_path / "s.npz", "--ref", tmp_path / "r.npz", "--json").stdout
    )
    assert against["reference"]["kind"] == "samples" and against["floor"] is None
    assert against["results"][0]["mmd2"] != vector["results"][0]["mmd2"]

    digits = tmp_path / "d"
    assert (
        cli(
            "sample",
            "--teacher",
            "builtin:digits",
            "--steps",
            "4",
            "-n",
            "40",
            "--out",
            digits,
            "--device",
            "cpu",
        ).code
        == 0
    )
    report = json.loads(cli("evaluate", digits, "--repeats", "2", "--json").stdout)
    assert set(report) >= layout and report["kind"] == "digits" and report["repeats"] == 2
    assert report["floor"]["n"] == 20 and report["results"][0]["classes_total"] == 10


def test_digits_beyond_the_held_out_count_are_also_scored_at_its_n(cli, tmp_path):
    out = tmp_path / "d"
    assert (
        cli(
            "sample",
            "--teacher",
            "builtin:digits",
            "--steps",
            "2",
            "-n",
            "900",
            "--out",
            out,
            "--device",
            "cpu",
        ).code
        == 0
    )
    report = json.loads(cli("evaluate", out, "--json").stdout)
    result = report["results"][0]
    assert result["n"] == 900 and report["floor"]["n"] == 797
    assert result["at_floor_n"]["n"] == 797
    text = cli("evaluate", out).stdout
    assert "1, first 797" in text and "held-out real" in text and "/10" in text


# --- --set ----------------------------------------------------------------------------------


def test_set_reaches_keys_without_flags_and_refuses_what_it_cannot_take(
    cli, tmp_path, small_trajectory
):
    shutil.copytree(small_trajectory, tmp_path / "t")
    result = cli(
        "backtrack",
        "-T",
        tmp_path / "t",
        *BACKTRACK,
        "--set",
        "ema_rampup=0.3",
        "--set",
        "betas=[0.1, 0.99]",
        "--set",
        "eval-samples=123",
        "--json",
    )
    config = json.loads(result.stdout)["config"]
    assert (config["ema_rampup"], config["betas"], config["eval_samples"]) == (
        0.3,
        [0.1, 0.99],
        123,
    )
    manifest = json.loads((tmp_path / "t/backtrack/default/manifest.json").read_text())
    assert manifest["config_sources"]["ema_rampup"] == "flag"
    for bad, message in (
        (["--set", "nope=1"], "nope"),
        (["--set", "ema_rampup"], "KEY=VALUE"),
        (["--set", "iters=5", "--iters", "6"], "both given"),
        (["--set", "lr_g=1", "--set", "lr_g=2"], "given twice"),
    ):
        result = cli("backtrack", "-T", tmp_path / "t", *bad)
        assert result.code == 2 and message in result.stderr, result.stderr


# --- runs -----------------------------------------------------------------------------------


def test_runs_tabulates_a_sweep_as_text_csv_and_json(cli, sweep):
    rows = json.loads(cli("runs", sweep, "--json").stdout)
    assert sorted((r["label"], r["method"]) for r in rows) == [
        ("s0/backtrack/baseline", "baseline"),
        ("s0/backtrack/default", "disback"),
        ("s1/backtrack/baseline", "baseline"),
        ("s1/backtrack/default", "disback"),
    ]
    one = next(r for r in rows if r["label"] == "s1/backtrack/default")
    lines = read_metrics(sweep / "s1/backtrack/default")
    evals = [ln["eval"]["mmd2"] for ln in lines if "eval" in ln]
    assert one["final_mmd2"] == evals[-1] and one["best_mmd2"] == min(evals)
    assert one["seed"] == 1 and one["step"] == 40 and one["seconds"] > 0

    ordered = json.loads(cli("runs", sweep, "--sort", "-final_mmd2", "--json").stdout)
    values = [r["final_mmd2"] for r in ordered]
    assert values == sorted(values, reverse=True)
    baselines = json.loads(cli("runs", sweep, "--where", "method=baseline", "--json").stdout)
    assert {r["name"] for r in baselines} == {"baseline"} and len(baselines) == 2
    table = list(csv.DictReader(io.StringIO(cli("runs", sweep, "--csv").stdout)))
    assert len(table) == 4 and {"final_mmd2", "loss", "seconds"} <= set(table[0])
    text = cli("runs", sweep / "s0").stdout
    assert "2 backtrack runs" in text and "final_mmd2" in text


# --- plot -----------------------------------------------------------------------------------


def test_plot_labels_runs_apart_and_marks_switches_where_they_happened(cli, sweep, tmp_path):
    runs = [sweep / "s0/backtrack/default", sweep / "s1/backtrack/default"]
    summary = json.loads(cli("plot", *runs, "--out", tmp_path / "c.png", "--json").stdout)
    assert summary["runs"] == [
        "s0/backtrack/default (DisBack, vsd)",
        "s1/backtrack/default (DisBack, vsd)",
    ]
    assert summary["metric"] == "mmd2" and summary["scale"] == "log"
    # 2 intermediate nodes, interval 10: the target moves after 10 and 20 iterations
    assert switch_iterations(read_metrics(runs[0])) == [10, 20]
    bounded = json.loads(
        cli("plot", *runs, "--metric", "precision", "--out", tmp_path / "p.png", "--json").stdout
    )
    assert bounded["scale"] == "linear"
    refused = cli("plot", *runs, "--metric", "fid", "--out", tmp_path / "f.png")
    assert refused.code == 2 and "logged: mmd2" in refused.stderr
    assert not (tmp_path / "f.png").exists()


def test_switches_are_logged_the_same_after_a_resume(cli, tmp_path, small_trajectory):
    shutil.copytree(small_trajectory, tmp_path / "t")
    assert cli("backtrack", "-T", tmp_path / "t", *BACKTRACK, "--iters", "20").code == 0
    assert cli("backtrack", "-T", tmp_path / "t", *BACKTRACK).code == 0  # extended to 40
    shutil.copytree(small_trajectory, tmp_path / "u")
    assert cli("backtrack", "-T", tmp_path / "u", *BACKTRACK).code == 0
    resumed = switch_iterations(read_metrics(tmp_path / "t/backtrack/default"))
    assert resumed == switch_iterations(read_metrics(tmp_path / "u/backtrack/default")) == [10, 20]


def test_unique_labels_take_the_shortest_distinguishing_suffix():
    assert unique_labels(["/a/x/run", "/b/x/run"]) == ["a/x/run", "b/x/run"]
    assert unique_labels(["/a/one", "/a/two"]) == ["one", "two"]


# --- teachers from anywhere, runs that do not exist -------------------------------------------


def test_a_trajectory_finds_its_teacher_from_another_folder_and_says_how_when_it_cannot(
    cli, tmp_path, monkeypatch
):
    teacher = tmp_path / "lab" / "teacher.safetensors"
    teacher.parent.mkdir()
    shutil.copy(Path(__file__).parent.parent / "disback_cli/builtin/ring2d.safetensors", teacher)
    monkeypatch.chdir(tmp_path / "lab")
    assert (
        cli(
            "record",
            "--teacher",
            "teacher.safetensors",
            "--out",
            "t",
            "--iters",
            "20",
            "--nodes",
            "2",
            "--batch",
            "32",
            "--device",
            "cpu",
        ).code
        == 0
    )
    monkeypatch.chdir(tmp_path)
    assert cli("backtrack", "-T", "lab/t", *BACKTRACK, "--iters", "10").code == 0
    teacher.rename(tmp_path / "moved.safetensors")
    missing = cli("backtrack", "-T", "lab/t", *BACKTRACK, "--iters", "20")
    assert missing.code == 1 and "--teacher" in missing.stderr
    assert (
        cli(
            "backtrack",
            "-T",
            "lab/t",
            *BACKTRACK,
            "--iters",
            "20",
            "--teacher",
            "moved.safetensors",
        ).code
        == 0
    )


def test_unknown_runs_list_the_runs_that_exist(cli, sweep):
    result = cli("sample", "-T", sweep / "s0", "--name", "nope", "-n", "2")
    assert result.code == 1 and "runs here: baseline, default" in result.stderr
    result = cli("sample", "-T", sweep / "s0/backtrack/default", "-n", "2")
    assert result.code == 1 and f"-T {sweep / 's0'} --name default" in result.stderr


# --- help -----------------------------------------------------------------------------------


def unwrapped(help_text: str) -> str:
    """Help text without rich's panel borders and line breaks, as one line of words."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", help_text).split())


def test_help_lists_choices_and_defaults_and_no_bool_metavars(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # wide enough that no metavar wraps
    record = cli("record", "--help").stdout
    assert "<even|distance>" in record and "<vsd|dmd|sid|diffratio>" in record
    sample = cli("sample", "--help").stdout
    assert "default: 1000 unless --seeds" in unwrapped(sample)
    for text in (record, sample, cli("backtrack", "--help").stdout):
        flag_lines = [ln for ln in text.splitlines() if "--json" in ln or "--quiet" in ln]
        assert flag_lines and not any("<bool>" in ln for ln in flag_lines)
    evaluate = unwrapped(cli("evaluate", "--help").stdout)
    workers = evaluate[evaluate.index("--workers") : evaluate.index("--device")]
    assert workers.count("default") == 1 and "min(4, cores)" in workers


# --- threads --------------------------------------------------------------------------------


def test_threads_default_from_the_environment_and_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert cpu_threads() == 1  # torchrun's processes share the cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3 and cpu_threads(5) == 5
    before = torch.get_num_threads()
    try:
        execution(SampleConfig(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_vector_teachers_default_to_one_thread_and_image_teachers_to_the_cores(monkeypatch):
    from disback_cli.config import BacktrackConfig
    from disback_cli.config.resolve import resolve_backtrack
    from disback_cli.models.teachers import open_teacher

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ring, digits = open_teacher("builtin:ring2d", "cpu"), open_teacher("builtin:digits", "cpu")
    cfg, sources = resolve_backtrack(BacktrackConfig(device="cpu"), ring)
    assert cfg.threads == 1 and sources["threads"] == "default for vector teachers"
    cfg, sources = resolve_backtrack(BacktrackConfig(device="cpu"), digits)
    assert cfg.threads is None and sources["threads"] == "default"  # the cores rule
    cfg, sources = resolve_backtrack(BacktrackConfig(device="cpu", threads=2), ring)
    assert cfg.threads == 2 and sources["threads"] == "flag"
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg, _ = resolve_backtrack(BacktrackConfig(device="cpu"), ring)
    assert cfg.threads is None and cpu_threads(cfg.threads) == 2
