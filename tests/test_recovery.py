"""Failures a long run meets: a stale lock, a diverging loss, a full disk, a kill mid-log."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import checkout_env, file_digests
from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.errors import DisbackError
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.teachers import open_teacher
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.stages import backtrack as backtrack_module
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store import fileio
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.lock import LOCK_FILE, run_lock
from disback_cli.store.manifests import BacktrackManifest, read_manifest
from disback_cli.store.metrics_log import truncate_metrics
from disback_cli.store.statefile import load_state, save_state
from disback_cli.store.tensorfile import encode_safetensors, read_safetensors

SMALL = dict(iters=60, interval=10, batch=64, save_every=20, log_every=10, device="cpu")


class Notes(SilentReporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.fixture
def trajectory(small_trajectory, tmp_path):
    shutil.copytree(small_trajectory, tmp_path / "t")
    return tmp_path / "t"


def test_stale_lock_of_a_dead_process_is_taken_over(trajectory, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"], env=checkout_env())
    dead.wait()
    run_dir = backtrack_dir(trajectory, "default")
    run_dir.mkdir(parents=True)
    stale = {"pid": dead.pid, "host": socket.gethostname(), "command": "disback backtrack"}
    (run_dir / LOCK_FILE).write_text(json.dumps(stale))
    notes = Notes()
    run_backtrack(BacktrackConfig(**SMALL), trajectory, reporter=notes)
    assert any(f"stale lock of pid {dead.pid}" in n for n in notes.notes)
    assert not (run_dir / LOCK_FILE).exists()  # released at the end


def test_lock_names_its_holder_and_is_released(tmp_path):
    with run_lock(tmp_path / "run", "record"):
        holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert holder == {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": "disback record",
        }
        refused = pytest.raises(DisbackError, match=f"in use by pid {os.getpid()} on ")
        with refused, run_lock(tmp_path / "run", "record"):
            pass
    assert not (tmp_path / "run").exists()  # created by the lock, left empty: removed


def poisoned_loss(monkeypatch, after: int, where: str) -> None:
    """From call `after` + 1 on, the generator loss (or only its gradient) is NaN."""
    real = backtrack_module.make_generator_loss

    class NaNGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def make(cfg, teacher=None):
        loss_fn, calls = real(cfg, teacher), [0]

        class Poisoned:
            def sample_sigma(self, *args):
                return loss_fn.sample_sigma(*args)

            def __call__(self, *args):
                out = loss_fn(*args)
                calls[0] += 1
                if calls[0] > after:
                    out.loss = (
                        out.loss * float("nan") if where == "loss" else NaNGradient.apply(out.loss)
                    )
                return out

        return Poisoned()

    monkeypatch.setattr(backtrack_module, "make_generator_loss", make)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_divergence_stops_within_the_iteration_and_keeps_the_last_checkpoint(
    trajectory, tmp_path, monkeypatch, where
):
    shutil.copytree(trajectory, tmp_path / "clean")
    poisoned_loss(monkeypatch, after=45, where=where)
    with pytest.raises(DisbackError) as info:
        run_backtrack(BacktrackConfig(**SMALL), trajectory)
    message = str(info.value)
    assert message.startswith("diverged at iteration 46 (")
    assert ("loss_g nan" in message) == (where == "loss") and "grad_norm_g nan" in message
    assert "checkpoints/state-00000040.safetensors (iteration 40) is intact" in message
    run_dir = backtrack_dir(trajectory, "default")
    assert read_manifest(run_dir, BacktrackManifest).step == 40
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["iteration"] == 40

    # The checkpoint is good: resuming without the fault ends where a clean run ends.
    monkeypatch.undo()
    run_backtrack(BacktrackConfig(**SMALL), trajectory)
    run_backtrack(BacktrackConfig(**SMALL), tmp_path / "clean")
    clean = file_digests(backtrack_dir(tmp_path / "clean", "default"))
    assert file_digests(run_dir) == clean


def test_divergence_from_a_huge_learning_rate_is_one_line(trajectory, cli):
    result = cli(
        "backtrack",
        "-T",
        trajectory,
        "--iters",
        "20",
        "--batch",
        "64",
        "--lr-g",
        "1",
        "--lr-fake",
        "1",
        "--save-every",
        "10",
        "--log-every",
        "10",
        "--quiet",  # no notes (the memory arithmetic) before the error
    )
    assert result.code == 1 and result.stderr.startswith("error: diverged at iteration ")
    assert "no checkpoint had been saved yet" in result.stderr
    assert result.stderr.count("\n") == 1


def test_full_disk_is_refused_before_recording(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(fileio, "free_bytes", lambda _: 10 << 20)
    result = cli("record", "--teacher", "builtin:ring2d", "--out", tmp_path / "t")
    assert result.code == 1 and "not enough disk space for the remaining path nodes" in (
        result.stderr
    )
    assert not (tmp_path / "t").exists()


def test_disk_filling_up_mid_run_keeps_the_previous_checkpoint(trajectory, monkeypatch):
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 20}), trajectory)
    run_dir = backtrack_dir(trajectory, "default")
    before = file_digests(run_dir, "**/*.*")
    free = [1 << 40]
    monkeypatch.setattr(fileio, "free_bytes", lambda _: free[0])

    class FillDisk(SilentReporter):
        def advance(self, completed: int, **fields: float) -> None:
            if completed == 30:
                free[0] = 1 << 20  # someone else filled the disk

    with pytest.raises(DisbackError, match="not enough disk space for generator-00000040"):
        run_backtrack(BacktrackConfig(**{**SMALL, "iters": 60}), trajectory, reporter=FillDisk())
    after = file_digests(run_dir, "**/*.*")
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == {
        k: v for k, v in before.items() if k != "metrics.jsonl"
    }
    assert not list(run_dir.rglob("*.tmp"))


def test_write_failing_with_enospc_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    fileio.atomic_write_bytes(target, b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DisbackError, match="disk full while writing; the previous file is intact"):
        fileio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_no_verify_accepts_a_changed_node_that_verify_refuses(trajectory, cli):
    node = trajectory / "nodes" / "node-001.safetensors"
    teacher = open_teacher("builtin:ring2d")
    save_denoiser(node, teacher.denoiser, teacher.spec, {"role": "path_node", "edited": True})
    args = ["backtrack", "-T", trajectory, "--iters", "20", "--batch", "64", "--save-every", "10"]
    refused = cli(*args)
    assert refused.code == 1 and "sha256 does not match the manifest" in refused.stderr
    assert "--no-verify" in refused.stderr
    accepted = cli(*args, "--no-verify")
    assert accepted.code == 0, accepted.stderr


def test_metrics_cut_mid_line_by_a_kill_are_repaired(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 10}\n{"iteration": 20}\n{"iteration": 30}\n{"itera')
    truncate_metrics(log, 20)
    assert log.read_text() == '{"iteration": 10}\n{"iteration": 20}\n'


def test_files_written_after_the_last_save_are_removed_on_resume(small_trajectory, tmp_path):
    out = tmp_path / "t"
    cfg = RecordConfig(
        **{
            **json.loads((small_trajectory / "manifest.json").read_text())["config"],
            "save_every": 20,
            "teacher": "builtin:ring2d",
        }
    )
    shutil.copytree(small_trajectory, out)
    manifest = json.loads((out / "manifest.json").read_text())
    # Pretend the run was killed after writing node 3 and a resume point but before the manifest.
    manifest.update(status="recording", nodes=manifest["nodes"][:3])
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "nodes" / ".node-003.safetensors.x1y2z3w4.tmp").write_bytes(b"partial")
    notes = Notes()
    run_record(cfg, out, reporter=notes)
    assert any(
        "node-003.safetensors (written after the last resume point)" in n for n in notes.notes
    )
    assert not list(out.rglob("*.tmp"))
    assert file_digests(out, "nodes/*") == file_digests(small_trajectory, "nodes/*")


def test_full_disk_is_refused_before_backtracking(trajectory, monkeypatch, cli):
    monkeypatch.setattr(fileio, "free_bytes", lambda _: 10 << 20)
    result = cli("backtrack", "-T", trajectory, "--iters", "20")
    assert result.code == 1 and "not enough disk space for two checkpoints" in result.stderr
    assert not (trajectory / "backtrack").exists()


def test_atomic_writes_give_files_the_usual_mode(tmp_path):
    """A temporary file is private (0600) until renamed; the result has the mode any new file
    gets under the umask, as `open` would give it."""
    old = os.umask(0o027)
    try:
        fileio.atomic_write_bytes(tmp_path / "a", b"x")
        fileio.atomic_write_chunks(tmp_path / "b", 2, [b"y", memoryview(b"z")])
    finally:
        os.umask(old)
    assert [(tmp_path / n).stat().st_mode & 0o777 for n in "ab"] == [0o640, 0o640]
    assert (tmp_path / "b").read_bytes() == b"yz"


@pytest.mark.parametrize("field", ["exp_avg", "exp_avg_sq", "step"])
def test_a_state_file_missing_part_of_an_optimiser_state_is_refused(tmp_path, field):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    rng = torch.Generator()
    save_state(tmp_path / "s", 1, {"net": net}, {"net": opt}, rng)
    tensors, metadata, _ = read_safetensors(tmp_path / "s")
    del tensors[f"optim.net.0.{field}"]
    digest = fileio.atomic_write_bytes(tmp_path / "s", encode_safetensors(tensors, metadata))
    fresh = torch.optim.Adam(net.parameters())
    with pytest.raises(DisbackError, match="incomplete optimiser state for net"):
        load_state(tmp_path / "s", digest, 1, {"net": net}, {"net": fresh}, rng)
