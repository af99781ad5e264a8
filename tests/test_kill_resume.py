"""SIGKILL at random moments, then resume: the final files equal an uninterrupted run's bitwise.

Each stage runs as a real `python -m disback_cli` process. After every kill the directory must be
consistent (manifest readable, every file it names present with its sha256), and the rerun must
resume from a saved iteration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from disback_cli.lock import LOCK_FILE
from disback_cli.trajectory import BacktrackManifest, TrajectoryManifest, read_manifest

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
BACKTRACK = ["backtrack", "--iters", "300", "--interval", "60", "--batch", "128",
             "--save-every", str(SAVE_EVERY), "--log-every", str(SAVE_EVERY), "--seed", "3",
             "--device", "cpu"]  # fmt: skip
KILLS = 3


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "disback_cli", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_lock(proc: subprocess.Popen, directory: Path, timeout: float = 60) -> float:
    """Block until `proc` holds the run lock (its imports and checks are done); return when."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((directory / LOCK_FILE).read_text()).get("pid") == proc.pid:
                return time.monotonic()
        except (OSError, ValueError):
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    raise AssertionError(f"process {proc.pid} never took the lock of {directory}")


def _run(args: list[str], cwd: Path, directory: Path) -> tuple[float, str]:
    """Uninterrupted run; returns the seconds it worked after taking the lock, and stderr."""
    proc = _start(args, cwd)
    started = _wait_for_lock(proc, directory)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return time.monotonic() - started, err


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


def _kill_and_resume(args, cwd, directory, model, work_seconds, rng) -> list[int]:
    """KILLS runs killed at random moments, then one run to the end; returns resume points."""
    resumed_from = []
    for _ in range(KILLS):
        proc = _start(args, cwd)
        _wait_for_lock(proc, directory)
        time.sleep(rng.uniform(0.05, 0.9 / KILLS) * work_seconds)  # all kills within one run
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.kill()
        proc.wait()
        saved = _assert_consistent(directory, model)
        assert saved % SAVE_EVERY == 0 or model is TrajectoryManifest
        resumed_from.append(saved)
    _, err = _run(args, cwd, directory)
    assert "stale lock" in err  # the SIGKILLed holder's lock file was detected and taken over
    if resumed_from[-1]:
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
    work, _ = _run([*RECORD, "--out", "ref"], tmp_path, tmp_path / "ref")
    resumed = _kill_and_resume([*RECORD, "--out", "killed"], tmp_path, tmp_path / "killed",
                               TrajectoryManifest, work, rng)  # fmt: skip
    assert any(resumed), "no kill landed after a resume point"
    print(f"record: killed 3 times, resumed from iterations {resumed}")
    nodes = _digests(tmp_path / "ref", "nodes/*")
    assert len(nodes) == 4 and nodes == _digests(tmp_path / "killed", "nodes/*")
    assert not list((tmp_path / "killed").rglob(".*.tmp"))
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["manifest.json", "nodes"]

    # Backtrack both from the same (reference) trajectory.
    shutil.copytree(tmp_path / "ref", tmp_path / "ref2")
    ref_run, killed_run = (tmp_path / t / "backtrack" / "default" for t in ("ref", "ref2"))
    work, _ = _run([*BACKTRACK, "-T", "ref"], tmp_path, ref_run)
    resumed = _kill_and_resume([*BACKTRACK, "-T", "ref2"], tmp_path, killed_run,
                               BacktrackManifest, work, rng)  # fmt: skip
    assert any(resumed), "no kill landed after a checkpoint"
    print(f"backtrack: killed 3 times, resumed from iterations {resumed}")
    final = _digests(ref_run, "checkpoints/*")
    assert len(final) == 3 and final == _digests(killed_run, "checkpoints/*")
    assert _metrics(ref_run) == _metrics(killed_run)
    assert not re.search(r"\.tmp$", "\n".join(map(str, killed_run.rglob("*"))))
