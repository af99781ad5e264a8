import hashlib
import itertools
import os
import shutil

import pytest

from conftest import SMALL_RECORD, file_digests
from disback_cli.config import RecordConfig
from disback_cli.errors import ConfigError, InterruptedRun
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.stages.record import run_record
from disback_cli.store.manifests import TrajectoryManifest, read_manifest


class CrashAt(SilentReporter):
    """Raises inside the loop after iteration `step`, like a killed process (not while the path
    probe, which reports its own progress, is built)."""

    def __init__(self, step: int) -> None:
        self.step, self.loop = step, True

    def start(self, description: str, total: int, completed: int) -> None:
        self.loop = description != "path probe"

    def advance(self, completed: int, **fields: float) -> None:
        if self.loop and completed == self.step:
            self.crash()

    def crash(self) -> None:
        raise RuntimeError("simulated crash")


def test_nodes_are_distinct_and_move_away_from_the_teacher(small_trajectory):
    manifest = read_manifest(small_trajectory, TrajectoryManifest)
    assert [n.step for n in manifest.nodes] == [0, 20, 40, 60]
    distances = [n.dist_to_teacher for n in manifest.nodes]
    assert distances[0] == 0 and all(a < b for a, b in itertools.pairwise(distances))
    assert len({n.sha256 for n in manifest.nodes}) == 4
    assert manifest.state is None and not (small_trajectory / "state").exists()
    assert manifest.config.p_mean == -0.5  # resolved from the teacher's training noise


def test_interrupted_recording_resumes_to_identical_nodes(small_trajectory, tmp_path):
    out = tmp_path / "t"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_record(RecordConfig(**SMALL_RECORD), out, reporter=CrashAt(31))
    partial = read_manifest(out, TrajectoryManifest)
    assert partial.status == "recording" and partial.state.step == 20
    assert [n.index for n in partial.nodes] == [0, 1]
    resumed = run_record(RecordConfig(**SMALL_RECORD), out)
    assert resumed.status == "complete"
    assert file_digests(out) == file_digests(small_trajectory)
    original = read_manifest(small_trajectory, TrajectoryManifest)
    assert [n.sha256 for n in resumed.nodes] == [n.sha256 for n in original.nodes]


def test_finished_recording_is_a_no_op_and_changes_need_force(small_trajectory, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(small_trajectory, out)
    before = (out / "manifest.json").read_text()
    run_record(RecordConfig(**SMALL_RECORD), out)
    assert (out / "manifest.json").read_text() == before
    changed = RecordConfig(**{**SMALL_RECORD, "lr": 3e-4})
    with pytest.raises(ConfigError, match=r"lr: 0.0001 -> 0.0003.*--force"):
        run_record(changed, out)
    assert (out / "manifest.json").read_text() == before
    redone = run_record(changed, out, force=True)
    assert redone.config.lr == 3e-4 and redone.status == "complete"


def test_session_options_may_change_on_rerun(small_trajectory, tmp_path):
    """A finished recording rerun with another session option is left exactly as it was: no
    file rewritten (same bytes, same modification times), added or removed."""
    out = tmp_path / "t"
    shutil.copytree(small_trajectory, out)

    def files():
        return {
            str(p.relative_to(out)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }

    for path in out.rglob("*"):  # a known past time: any rewrite, even of the same bytes, shows
        os.utime(path, ns=(10**18, 10**18), follow_symlinks=False)
    before = files()
    assert len(before) == 4  # the manifest and three node files
    manifest = run_record(RecordConfig(**{**SMALL_RECORD, "save_every": 7}), out)
    assert manifest.status == "complete"
    assert files() == before
    assert manifest.model_dump() == read_manifest(small_trajectory, TrajectoryManifest).model_dump()
    assert manifest.session["noop"] and manifest.session["iterations_run"] == 0


def test_nodes_beyond_iterations_are_a_config_error():
    with pytest.raises(ValueError, match="must not exceed iters"):
        RecordConfig(teacher="builtin:ring2d", iters=3, nodes=5)


def test_placement_by_distance_spreads_nodes_evenly_along_the_path(tmp_path):
    cfg = RecordConfig(teacher="builtin:ring2d", iters=300, nodes=4, batch=64, device="cpu")
    even = run_record(cfg, tmp_path / "even")
    spread = run_record(cfg.model_copy(update={"placement": "distance"}), tmp_path / "spread")

    def shares(manifest):
        final = manifest.nodes[-1].dist_to_teacher
        return [n.dist_to_teacher / final for n in manifest.nodes[1:]]

    assert [n.step for n in even.nodes[1:]] == [75, 150, 225, 300]
    assert spread.node_plan == [n.step for n in spread.nodes[1:]] and spread.node_plan[-1] == 300
    assert spread.node_plan[0] < 75  # the path moves fastest at the start
    deviation = [abs(s - (i + 1) / 4) for i, s in enumerate(shares(spread))]
    assert max(deviation) < 0.08
    assert max(deviation) < max(abs(s - (i + 1) / 4) for i, s in enumerate(shares(even)))


def test_placement_by_distance_resumes_to_identical_nodes(tmp_path):
    cfg = RecordConfig(**SMALL_RECORD, placement="distance")
    run_record(cfg, tmp_path / "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_record(cfg, tmp_path / "broken", reporter=CrashAt(45))
    run_record(cfg, tmp_path / "broken")
    assert file_digests(tmp_path / "whole") == file_digests(tmp_path / "broken")


class InterruptAt(CrashAt):
    """Ctrl-C raised inside a phase (as a second SIGINT or one outside the iterations does)."""

    def crash(self) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_in_any_phase_says_what_was_kept(small_trajectory, tmp_path, cli, monkeypatch):
    out = tmp_path / "t"
    with pytest.raises(InterruptedRun, match="keeps its resume point at iteration 20; run the"):
        run_record(RecordConfig(**SMALL_RECORD), out, reporter=InterruptAt(31))
    resumed = run_record(RecordConfig(**SMALL_RECORD), out)  # and the rerun resumes, exactly
    assert file_digests(out) == file_digests(small_trajectory)
    assert resumed.status == "complete"

    def probe_interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("disback_cli.stages.record.PathProbe", probe_interrupted)
    done = cli("record", "--teacher", "builtin:ring2d", "--out", tmp_path / "new")
    assert done.code == 130
    assert done.stderr.splitlines()[-1] == (
        f"error: interrupted before the first resume point of the recording in {tmp_path / 'new'}"
        ": nothing to resume; run the same command again to start it"
    )
    monkeypatch.setattr("disback_cli.stages.record.open_teacher", probe_interrupted)
    done = cli("record", "--teacher", "builtin:ring2d", "--out", tmp_path / "other")
    assert (done.code, done.stderr) == (
        130,
        "error: interrupted; the files disback had finished are kept (each is written whole)\n",
    )
