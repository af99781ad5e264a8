"""SIGKILL at random moments, then resume: the final files equal an uninterrupted run's bitwise.

Each stage runs as a real `python -m disback_cli` process. Kills are placed without timing
assumptions: the test watches the manifest until the run has saved past a given iteration, then
waits a seeded random delay and kills, so it lands anywhere in the work that follows (a save
included), however loaded the machine is. After every kill the directory must be consistent
(manifest readable, every file it names present with its sha256), and the rerun must resume from
the saved iteration.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import checkout_env
from disback_cli.store.lock import LOCK_FILE
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest

SAVE_EVERY = 10
RECORD = [
    "record",
    "--teacher",
    "builtin:ring2d",
    "--iters",
    "800",
    "--nodes",
    "4",
    "--batch",
    "128",
    "--save-every",
    str(SAVE_EVERY),
    "--seed",
    "3",
    "--device",
    "cpu",
]
BACKTRACK = [
    "backtrack",
    "--iters",
    "400",
    "--interval",
    "60",
    "--batch",
    "128",
    "--save-every",
    str(SAVE_EVERY),
    "--log-every",
    str(SAVE_EVERY),
    "--seed",
    "3",
    "--device",
    "cpu",
]
# Kill k comes after the run has saved at or past iteration KILL_AFTER[k]: far from the end (800
# and 400 iterations), so the seeded delay that follows cannot outlast the run.
RECORD_KILLS = (60, 200, 340)
BACKTRACK_KILLS = (20, 80, 140)
MAX_DELAY = 0.25  # seconds after the observed save


HANG = 900  # seconds: only a guard against a hung process, far beyond any real run


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    """The command as its own process, stderr to a file (a pipe could fill and stall it)."""
    env = checkout_env(PYTHONHASHSEED="0")
    command = [sys.executable, "-m", "disback_cli", *args]
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log
    return proc


def _stderr(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def _until(condition, proc: subprocess.Popen, what: str) -> None:
    """Poll `condition` while `proc` lives; fail if it exits first (or hangs for HANG seconds)."""
    deadline = time.monotonic() + HANG
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {_stderr(proc)}"
        assert time.monotonic() < deadline, f"no progress towards {what} in {HANG} s"
        time.sleep(0.002)


def _holds_lock(proc: subprocess.Popen, directory: Path) -> bool:
    try:
        return json.loads((directory / LOCK_FILE).read_text()).get("pid") == proc.pid
    except (OSError, ValueError):
        return False


def _saved_step(directory: Path, model) -> int:
    """The iteration of the run's last save as its manifest names it (0 before the first)."""
    try:
        manifest = read_manifest(directory, model)
    except Exception:  # not written yet, or being replaced this instant
        return 0
    if manifest.state is not None:
        return manifest.state.step
    return manifest.nodes[-1].step if model is TrajectoryManifest else manifest.step


def _run(args: list[str], cwd: Path) -> str:
    """An uninterrupted run to the end; returns its stderr."""
    proc = _start(args, cwd)
    proc.wait(timeout=HANG)
    err = _stderr(proc)
    assert proc.returncode == 0, err
    return err


def _assert_consistent(directory: Path, model) -> int:
    """Manifest readable and every file it names intact; returns the saved iteration."""
    if not (directory / "manifest.json").exists():
        return 0
    manifest = read_manifest(directory, model)
    assert manifest.status != "complete", "the kill came after the run had finished"
    refs = [manifest.state] if manifest.state else []
    if model is TrajectoryManifest:
        refs += [n for n in manifest.nodes if n.file]
    else:
        refs += [r for r in (manifest.generator, manifest.generator_ema) if r]
    for ref in refs:
        digest = hashlib.sha256((directory / ref.file).read_bytes()).hexdigest()
        assert digest == ref.sha256, f"{ref.file} does not match the manifest after a kill"
    return manifest.state.step if manifest.state else 0


def _kill_and_resume(args, cwd, directory, model, kill_after, rng) -> list[int]:
    """One run killed after each save point in `kill_after` (plus a seeded delay), then one run
    to the end; returns the iterations the runs resumed from."""
    resumed_from = []
    for threshold in kill_after:
        proc = _start(args, cwd)
        _until(lambda: _holds_lock(proc, directory), proc, "taking the lock")  # noqa: B023
        _until(
            lambda: _saved_step(directory, model) >= threshold,  # noqa: B023
            proc,
            f"saving iteration {threshold}",
        )
        time.sleep(rng.uniform(0, MAX_DELAY))
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait()
        saved = _assert_consistent(directory, model)
        assert saved >= threshold
        assert saved % SAVE_EVERY == 0 or model is TrajectoryManifest
        resumed_from.append(saved)
    err = _run(args, cwd)
    assert "stale lock" in err  # the SIGKILLed holder's lock file was detected and taken over
    assert f"from iteration {resumed_from[-1]}" in err
    return resumed_from


def _digests(directory: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.glob(pattern))
    }


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in lines]


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tmp_path):
    rng = random.Random(7)
    _run([*RECORD, "--out", "ref"], tmp_path)
    resumed = _kill_and_resume(
        [*RECORD, "--out", "killed"],
        tmp_path,
        tmp_path / "killed",
        TrajectoryManifest,
        RECORD_KILLS,
        rng,
    )
    print(f"record: killed 3 times, resumed from iterations {resumed}")
    nodes = _digests(tmp_path / "ref", "nodes/*")
    assert len(nodes) == 4 and nodes == _digests(tmp_path / "killed", "nodes/*")
    assert not list((tmp_path / "killed").rglob(".*.tmp"))
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["manifest.json", "nodes"]

    # Backtrack both from the same (reference) trajectory.
    shutil.copytree(tmp_path / "ref", tmp_path / "ref2")
    ref_run, killed_run = (tmp_path / t / "backtrack" / "default" for t in ("ref", "ref2"))
    _run([*BACKTRACK, "-T", "ref"], tmp_path)
    resumed = _kill_and_resume(
        [*BACKTRACK, "-T", "ref2"], tmp_path, killed_run, BacktrackManifest, BACKTRACK_KILLS, rng
    )
    print(f"backtrack: killed 3 times, resumed from iterations {resumed}")
    final = _digests(ref_run, "checkpoints/*")
    assert len(final) == 3 and final == _digests(killed_run, "checkpoints/*")
    assert _metrics(ref_run) == _metrics(killed_run)
    assert not re.search(r"\.tmp$", "\n".join(map(str, killed_run.rglob("*"))))
