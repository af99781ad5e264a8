"""--log-to tensorboard and --log-to wandb, offline: each tracker receives exactly the lines
metrics.jsonl holds (the file stays the source of truth)."""

from __future__ import annotations

import shutil

import pytest

from disback_cli.runtime.tracking import scalars
from disback_cli.store.metrics_log import read_metrics

BACKTRACK = [
    "--iters",
    "30",
    "--interval",
    "10",
    "--batch",
    "32",
    "--save-every",
    "10",
    "--log-every",
    "10",
    "--eval-every",
    "10",
    "--device",
    "cpu",
    "--set",
    "eval_samples=200",
]


def test_lines_become_flat_scalar_tags():
    line = {"loss_g": 1.5, "target_node": 2, "eval": {"mmd2": 0.25}}
    assert scalars(line) == {"loss_g": 1.5, "target_node": 2.0, "eval/mmd2": 0.25}


def test_tensorboard_events_hold_the_metrics_lines(cli, tmp_path, small_trajectory):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.copytree(small_trajectory, tmp_path / "t")
    result = cli("backtrack", "-T", tmp_path / "t", *BACKTRACK, "--log-to", "tensorboard")
    assert result.code == 0, result.stderr
    run = tmp_path / "t/backtrack/default"
    (folder,) = (run / "tensorboard").iterdir()  # one folder per run, named by its start
    events = EventAccumulator(str(folder))
    events.Reload()
    lines = read_metrics(run)
    for tag in ("loss_g", "score_gap", "eval/mmd2"):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [
            (ln["iteration"], pytest.approx(v, rel=1e-6))
            for ln in lines
            for k, v in scalars(ln).items()
            if k == tag
        ]
        assert logged == expected, tag


def test_wandb_offline_run_holds_the_config_and_the_logged_tags(
    cli, tmp_path, small_trajectory, monkeypatch
):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    shutil.copytree(small_trajectory, tmp_path / "t")
    result = cli("backtrack", "-T", tmp_path / "t", *BACKTRACK, "--log-to", "wandb")
    assert result.code == 0, result.stderr
    run = tmp_path / "t/backtrack/default"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    records = b"".join(p.read_bytes() for p in offline[0].glob("*.wandb"))  # for `wandb sync`
    # W&B's record file is protobuf; the config keys and every logged tag are in it verbatim.
    assert b"interval" in records and b"vsd" in records
    for tag in ("loss_g", "score_gap", "eval/mmd2"):
        assert tag.encode() in records, tag


def test_an_unknown_tracker_is_a_flag_error(cli, tmp_path, small_trajectory):
    shutil.copytree(small_trajectory, tmp_path / "t")
    result = cli("backtrack", "-T", tmp_path / "t", *BACKTRACK, "--log-to", "mlflow")
    assert result.code == 2 and "log-to" in result.stderr


def test_an_extended_run_writes_into_its_own_tensorboard_folder(cli, tmp_path, small_trajectory):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.copytree(small_trajectory, tmp_path / "t")
    first = [*BACKTRACK, "--log-to", "tensorboard"]
    assert cli("backtrack", "-T", tmp_path / "t", *first).code == 0
    extended = [*first[: first.index("30")], "50", *first[first.index("30") + 1 :]]
    assert cli("backtrack", "-T", tmp_path / "t", *extended).code == 0
    (folder,) = (tmp_path / "t/backtrack/default/tensorboard").iterdir()
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [e.step for e in events.Scalars("loss_g")] == [10, 20, 30, 40, 50]


def test_wandb_without_credentials_is_one_line_and_the_run_resumes_without_it(
    cli, tmp_path, small_trajectory, monkeypatch
):
    """W&B refuses an online run without an API key before it touches the network, so this
    runs offline: the refusal is one line with what to do, and the run it interrupted resumes."""
    wandb = pytest.importorskip("wandb", reason="the wandb extra is not installed")
    wandb.teardown()  # settings an earlier test's run left in W&B's process-wide singleton
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    shutil.copytree(small_trajectory, tmp_path / "t")
    refused = cli("backtrack", "-T", tmp_path / "t", *BACKTRACK, "--log-to", "wandb")
    assert refused.code == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--log-to wandb: No API key configured" in refused.stderr
    assert "(log in with `wandb login`, or set WANDB_MODE=offline)" in refused.stderr
    assert "Traceback" not in refused.stderr
    resumed = cli("backtrack", "-T", tmp_path / "t", *BACKTRACK)
    assert resumed.code == 0, resumed.stderr
    assert [m["iteration"] for m in read_metrics(tmp_path / "t/backtrack/default")][-1] == 30
