import json
import os
import shutil
import signal

import pytest
from first_iteration import first_iteration

from conftest import file_digests
from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.errors import ConfigError, DisbackError, InterruptedRun
from disback_cli.method.schedule import target_node
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, read_manifest

SMALL = dict(iters=60, interval=10, batch=64, save_every=20, log_every=10, device="cpu")


class At(SilentReporter):
    """Calls `action` when the loop reports iteration `step` (reports come on log lines; the
    path probe's progress is not the loop's)."""

    def __init__(self, step: int, action) -> None:
        self.step, self.action, self.loop = step, action, True

    def start(self, description: str, total: int, completed: int) -> None:
        self.loop = description != "path probe"

    def advance(self, completed: int, **fields: float) -> None:
        if self.loop and completed == self.step:
            self.action()


def crash() -> None:
    raise RuntimeError("simulated crash")


@pytest.fixture
def trajectory(small_trajectory, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(small_trajectory, out)
    return out


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in lines]


def test_target_walks_the_path_back_to_the_teacher(trajectory):
    manifest = run_backtrack(BacktrackConfig(**SMALL), trajectory)
    assert manifest.status == "complete" and manifest.step == 60
    lines = metrics(backtrack_dir(trajectory, "default"))
    assert [ln["iteration"] for ln in lines] == [10, 20, 30, 40, 50, 60]
    assert [ln["target_node"] for ln in lines] == [
        target_node(i - 1, 3, 10) for i in range(10, 61, 10)
    ]
    assert [ln["target_node"] for ln in lines] == [2, 1, 0, 0, 0, 0]
    assert all(ln["loss_fake"] > 0 and ln["grad_norm_g"] > 0 for ln in lines)


def test_baseline_starts_with_fake_equal_to_target(trajectory):
    cfg = dict(iters=2, batch=64, log_every=1, save_every=0, device="cpu")
    run_backtrack(BacktrackConfig(**cfg, no_trajectory=True), trajectory, "base")
    run_backtrack(BacktrackConfig(**cfg), trajectory, "disback")
    base = metrics(backtrack_dir(trajectory, "base"))
    disback = metrics(backtrack_dir(trajectory, "disback"))
    assert base[0]["score_gap"] == 0.0 and [ln["target_node"] for ln in base] == [0, 0]
    assert disback[0]["score_gap"] > 0.0 and disback[0]["target_node"] == 2


def test_crash_then_resume_gives_identical_weights_and_log(trajectory, tmp_path):
    run_backtrack(BacktrackConfig(**SMALL), trajectory, "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(BacktrackConfig(**SMALL), trajectory, "broken", reporter=At(30, crash))
    partial = read_manifest(backtrack_dir(trajectory, "broken"), BacktrackManifest)
    assert partial.status == "running" and partial.step == 20
    run_backtrack(BacktrackConfig(**SMALL), trajectory, "broken")
    whole, broken = backtrack_dir(trajectory, "whole"), backtrack_dir(trajectory, "broken")
    assert file_digests(whole) == file_digests(broken)
    assert metrics(whole) == metrics(broken)


def test_sigint_saves_state_and_rerun_resumes_identically(trajectory):
    run_backtrack(BacktrackConfig(**SMALL), trajectory, "whole")
    interrupt = At(30, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(InterruptedRun, match="SIGINT at iteration 30"):
        run_backtrack(BacktrackConfig(**SMALL), trajectory, "stopped", reporter=interrupt)
    assert read_manifest(backtrack_dir(trajectory, "stopped"), BacktrackManifest).step == 30
    run_backtrack(BacktrackConfig(**SMALL), trajectory, "stopped")
    whole, stopped = backtrack_dir(trajectory, "whole"), backtrack_dir(trajectory, "stopped")
    assert file_digests(whole) == file_digests(stopped)


def test_a_stop_on_a_save_step_keeps_one_resume_point_and_a_stop_on_the_last_completes(trajectory):
    """The lifecycle where a stop meets a periodic save (iteration 40) or the end (60)."""
    run_backtrack(BacktrackConfig(**SMALL), trajectory, "whole")
    stop_at = lambda step: At(step, lambda: os.kill(os.getpid(), signal.SIGINT))  # noqa: E731
    with pytest.raises(InterruptedRun, match="SIGINT at iteration 40"):
        run_backtrack(BacktrackConfig(**SMALL), trajectory, "stopped", reporter=stop_at(40))
    stopped = backtrack_dir(trajectory, "stopped")
    manifest = read_manifest(stopped, BacktrackManifest)
    assert manifest.status == "running" and manifest.state.step == 40
    states = [p for p in stopped.rglob("*") if "state" in p.name]
    assert [p.relative_to(stopped).as_posix() for p in states] == [manifest.state.file]
    resumed = run_backtrack(BacktrackConfig(**SMALL), trajectory, "stopped")
    assert resumed.session["resumed_from"] == 40 and resumed.session["iterations_run"] == 20
    assert file_digests(backtrack_dir(trajectory, "whole")) == file_digests(stopped)
    last = run_backtrack(BacktrackConfig(**SMALL), trajectory, "last", reporter=stop_at(60))
    assert last.status == "complete" and last.state.step == 60
    assert file_digests(backtrack_dir(trajectory, "whole")) == file_digests(
        backtrack_dir(trajectory, "last")
    )


def test_extending_a_finished_run_equals_a_longer_run(trajectory):
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 40}), trajectory, "short")
    run_backtrack(BacktrackConfig(**SMALL), trajectory, "short")
    run_backtrack(BacktrackConfig(**SMALL), trajectory, "long")
    short, long = backtrack_dir(trajectory, "short"), backtrack_dir(trajectory, "long")
    assert file_digests(short) == file_digests(long)
    assert metrics(short) == metrics(long)


def test_finished_run_is_a_no_op_and_changed_config_needs_force(trajectory):
    run_backtrack(BacktrackConfig(**SMALL), trajectory)
    run_dir = backtrack_dir(trajectory, "default")
    before = (run_dir / "manifest.json").read_text()
    run_backtrack(BacktrackConfig(**SMALL), trajectory)
    assert (run_dir / "manifest.json").read_text() == before
    with pytest.raises(ConfigError, match=r"lr_g.*--force"):
        run_backtrack(BacktrackConfig(**{**SMALL, "lr_g": 1e-3}), trajectory)
    assert (run_dir / "manifest.json").read_text() == before
    manifest = run_backtrack(BacktrackConfig(**{**SMALL, "lr_g": 1e-3}), trajectory, force=True)
    assert manifest.config.lr_g == 1e-3


def test_backtrack_refuses_a_trajectory_still_recording(tmp_path):
    cfg = RecordConfig(teacher="builtin:ring2d", iters=60, nodes=3, batch=64, device="cpu")
    with pytest.raises(RuntimeError):
        run_record(cfg, tmp_path / "t", reporter=At(25, crash))
    with pytest.raises(DisbackError, match="still recording"):
        run_backtrack(BacktrackConfig(**SMALL), tmp_path / "t")


def test_evaluation_during_training_needs_ground_truth_and_logs_metrics(trajectory):
    cfg = BacktrackConfig(**{**SMALL, "iters": 20, "eval_every": 10, "eval_samples": 200})
    run_backtrack(cfg, trajectory)
    lines = metrics(backtrack_dir(trajectory, "default"))
    assert set(lines[-1]["eval"]) == {
        "mmd2",
        "sliced_w2",
        "precision",
        "modes_covered",
        "modes_total",
        "mode_tv",
    }


def test_save_every_must_fall_on_log_lines():
    with pytest.raises(ValueError, match="multiple of log-every"):
        BacktrackConfig(save_every=15, log_every=10)


@pytest.mark.parametrize("loss", ["dmd", "sid"])
def test_every_loss_trains_through_the_same_loop(trajectory, loss):
    """The loop's first iteration logs the loss, score gap and gradient norm that the loss's
    paper gives for the same networks and random numbers (see `first_iteration`)."""
    # the log-normal path serves dmd too when its noise levels are chosen explicitly
    cfg = BacktrackConfig(**{**SMALL, "log_every": 1}, loss=loss, dsm_sigma="lognormal")
    manifest = run_backtrack(cfg, trajectory, loss)
    lines = metrics(backtrack_dir(trajectory, loss))
    assert manifest.config.loss == loss and len(lines) == 60
    assert [ln["target_node"] for ln in lines] == [2] * 10 + [1] * 10 + [0] * 40
    expected = first_iteration(trajectory, backtrack_dir(trajectory, loss))
    for key, value in expected.items():
        assert lines[0][key] == pytest.approx(value, rel=1e-5), key
    assert all(ln["grad_norm_g"] > 0 for ln in lines)


def test_adaptive_switching_resumes_exactly(trajectory):
    cfg = BacktrackConfig(**SMALL, switch="adaptive", switch_patience=3)
    run_backtrack(cfg, trajectory, "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(cfg, trajectory, "broken", reporter=At(30, crash))
    run_backtrack(cfg, trajectory, "broken")
    whole, broken = backtrack_dir(trajectory, "whole"), backtrack_dir(trajectory, "broken")
    assert metrics(whole) == metrics(broken)
    assert file_digests(whole) == file_digests(broken)
    targets = [ln["target_node"] for ln in metrics(whole)]
    assert targets == sorted(targets, reverse=True) and targets[-1] == 0


def test_adaptive_patience_not_below_the_interval_is_refused_for_new_runs_only(trajectory):
    settings = {**SMALL, "switch": "adaptive", "switch_patience": 10}
    with pytest.raises(ValueError, match=r"switch-patience \(10\) must be below interval \(10\)"):
        BacktrackConfig(**settings)
    run_backtrack(BacktrackConfig(**{**settings, "switch_patience": 3}), trajectory, "old")
    # A run an older disback made with patience 10, interval 10 stays readable.
    path = backtrack_dir(trajectory, "old") / "manifest.json"
    raw = json.loads(path.read_text())
    raw["config"]["switch_patience"] = 10
    path.write_text(json.dumps(raw))
    manifest = read_manifest(path.parent, BacktrackManifest)
    assert (manifest.config.switch_patience, manifest.config.interval) == (10, 10)


def test_random_student_smaller_than_the_teacher(tmp_path):
    from disback_cli.models.denoiser_files import load_denoiser
    from disback_cli.store.manifests import TrajectoryManifest

    cfg = RecordConfig(
        teacher="builtin:ring2d",
        iters=20,
        nodes=2,
        batch=32,
        device="cpu",
        student_arch_kwargs={"hidden": 32},
    )
    traj = run_record(cfg, tmp_path / "t")
    assert traj.g0.kind == "random"
    assert traj.g0.network["arch_kwargs"]["hidden"] == 32
    manifest = run_backtrack(BacktrackConfig(**{**SMALL, "iters": 20}), tmp_path / "t")
    generator = load_denoiser(backtrack_dir(tmp_path / "t", "default") / manifest.generator.file)
    node = load_denoiser(tmp_path / "t" / traj.nodes[-1].file)
    assert generator.spec.arch_kwargs["hidden"] == 32 and node.spec.arch_kwargs["hidden"] == 128
    assert read_manifest(tmp_path / "t", TrajectoryManifest).g0 == traj.g0


def test_student_from_a_file(tmp_path):
    from disback_cli.models.denoiser_files import save_denoiser
    from disback_cli.models.networks import NetworkSpec, build_denoiser

    spec = NetworkSpec(
        arch="mlp",
        arch_kwargs={"hidden": 16, "depth": 2},
        precond_kwargs={"sigma_data": 1.4},
        data_shape=(2,),
    )
    save_denoiser(tmp_path / "student.safetensors", build_denoiser(spec), spec, {"role": "student"})
    cfg = RecordConfig(
        teacher="builtin:ring2d",
        iters=20,
        nodes=2,
        batch=32,
        device="cpu",
        student=str(tmp_path / "student.safetensors"),
    )
    traj = run_record(cfg, tmp_path / "t")
    assert traj.g0.kind == "file" and len(traj.g0.sha256) == 64
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 20}), tmp_path / "t")
    (tmp_path / "student.safetensors").write_bytes(b"changed")
    with pytest.raises(DisbackError, match="sha256 does not match"):
        run_backtrack(BacktrackConfig(**{**SMALL, "iters": 40}), tmp_path / "t")
