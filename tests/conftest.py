"""Shared fixtures: a small recorded trajectory and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from disback_cli.cli.app import main
from disback_cli.config import RecordConfig
from disback_cli.stages.record import run_record

# One thread per pytest-xdist worker (`make test` runs one worker per core), two otherwise.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

# The checkout these tests belong to: its disback_cli, not an installed copy elsewhere, is what
# they test, in this process (see test_cli) and in every subprocess (`checkout_env`).
REPO = Path(__file__).resolve().parent.parent

SMALL_RECORD = dict(teacher="builtin:ring2d", iters=60, nodes=3, batch=64, device="cpu")


def disback_launcher(processes: int = 1) -> list[str]:
    """`python -m disback_cli`, or as torchrun launches it with `processes` on this host."""
    if processes == 1:
        return [sys.executable, "-m", "disback_cli"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "disback_cli",
    ]


def launch(
    cwd: Path,
    *args,
    processes: int = 1,
    env: dict[str, str] | None = None,
    fresh: bool = False,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`disback ARGS` in `cwd`, its code, stdout and stderr: one process in this one (no
    interpreter to start) unless `fresh` (a new interpreter, set up as torchrun's workers are),
    several as torchrun launches them, with `env`."""
    if processes == 1 and not fresh:
        with contextlib.chdir(cwd):
            done = run_cli(*args)
        return subprocess.CompletedProcess(args, done.code, done.stdout, done.stderr)
    return subprocess.run(
        [*disback_launcher(processes), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (torchrun's workers run in sessions of their own)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def checkout_env(*first: str | Path, **variables: str) -> dict[str, str]:
    """The environment for a subprocess that must run this checkout's code: os.environ with
    `variables` set and PYTHONPATH = `first` (e.g. a sitecustomize hook), the repository root,
    then whatever PYTHONPATH held, so `python -m disback_cli` finds the checkout before any
    installed copy, whatever the subprocess's working directory."""
    old = os.environ.get("PYTHONPATH", "")
    path = [*map(str, first), str(REPO), *([old] if old else [])]
    inherited = {k: v for k, v in os.environ.items() if k not in TERMINAL_SIZE}
    return {**inherited, **variables, "PYTHONPATH": os.pathsep.join(path)}


# pytest-xdist's workers run with COLUMNS=80 and LINES=24; a subprocess sees the terminal size
# only when a test gives it, as a serial run does.
TERMINAL_SIZE = ("COLUMNS", "LINES")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test may download anything: detectors are looked up in an empty cache only."""
    monkeypatch.setenv("DISBACK_OFFLINE", "1")
    monkeypatch.setenv("DISBACK_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("DISBACK_INCEPTION", raising=False)


def run_cli(*args: str) -> CliResult:
    """`disback ARGS...` in-process with its own capture (for fixtures wider than one test)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def cli_module():
    return run_cli


@pytest.fixture
def cli(capsys):
    """Run `disback ARGS...` in-process through the real entry point (error handling included)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def small_trajectory(tmp_path_factory) -> Path:
    """A 3-node ring2d trajectory (60 iterations); treat as read-only, copy it to modify."""
    out = tmp_path_factory.mktemp("traj") / "t"
    run_record(RecordConfig(**SMALL_RECORD), out)
    return out


def backtracked_copy(trajectory: Path, folder: Path, **config) -> Path:
    """A copy of `trajectory` in `folder/t` with its `default` run backtracked with `config`."""
    from disback_cli.config import BacktrackConfig
    from disback_cli.stages.backtrack import run_backtrack

    out = folder / "t"
    shutil.copytree(trajectory, out)
    run_backtrack(BacktrackConfig(**config), out)
    return out


def file_digests(directory: Path, pattern: str = "**/*.safetensors") -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.glob(pattern))
    }


@pytest.fixture(scope="session")
def template(tmp_path_factory) -> Path:
    """The bad-input corpus's world (see `corpus`); copied for every case, never changed."""
    from corpus import build_template

    return build_template(tmp_path_factory.mktemp("world"))
