"""The run lifecycle's small rules one by one (`stages/lifecycle.py`): the optimisers, the two
random streams, what counts as a configuration change, and the divergence stop's message. Runs
that resume, extend and stop are in test_backtrack.py, test_record.py and test_recovery.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_backtrack import At
from torch import nn

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.runtime.parallel import Execution
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.lifecycle import (
    BACKTRACKING,
    RECORDING,
    check_finite,
    config_changes,
    make_optimizer,
    seed_streams,
)
from disback_cli.stages.record import run_record
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, StateRef, read_manifest


def test_adam_or_adamw_with_the_given_rates_and_decay():
    params = list(nn.Linear(2, 2).parameters())
    adam = make_optimizer(params, 0.01, (0.0, 0.99))
    assert type(adam) is torch.optim.Adam
    group = adam.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["foreach"]) == (
        0.01,
        (0.0, 0.99),
        0,
        True,
    )
    adamw = make_optimizer(params, 0.02, (0.9, 0.999), "adamw", weight_decay=0.01)
    assert type(adamw) is torch.optim.AdamW
    group = adamw.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["foreach"]) == (
        0.02,
        (0.9, 0.999),
        0.01,
        True,
    )


def test_the_run_stream_is_the_seed_and_the_global_stream_is_the_ranks():
    rng = seed_streams(7, Execution(torch.device("cpu")))
    assert torch.equal(rng.get_state(), torch.Generator().manual_seed(7).get_state())
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(7).get_state())
    second = Execution(torch.device("cpu"), rank=1, world_size=2)
    rng = seed_streams(7, second)
    assert torch.equal(rng.get_state(), torch.Generator().manual_seed(7).get_state())
    own = torch.Generator().manual_seed(second.rank_seed(7)).get_state()
    assert torch.equal(torch.get_rng_state(), own) and second.rank_seed(7) != 7


def test_configuration_changes_are_listed_field_by_field():
    assert config_changes({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    assert config_changes({"a": 1, "b": 2}, {"b": 3, "a": 1, "c": None}) == ["b: 2 -> 3"]
    assert config_changes({"a": 1}, {"a": "1", "z": 0}) == ["a: 1 -> '1'", "z: None -> 0"]


def test_finite_values_pass_and_a_divergence_names_the_last_good_checkpoint(tmp_path):
    check_finite(3, tmp_path, None, loss=torch.tensor(1.0), grad=torch.tensor(2.0))
    state = StateRef(file="checkpoints/state-00000040.safetensors", sha256="0" * 64, step=40)
    with pytest.raises(DisbackError) as caught:
        check_finite(47, tmp_path, state, loss=torch.tensor(float("nan")), grad=torch.tensor(2.0))
    assert str(caught.value) == (
        f"diverged at iteration 47 (loss nan, grad 2); nothing from it was saved; last good "
        f"checkpoint {tmp_path / state.file} (iteration 40) is intact; lower the learning rate "
        "or set --grad-clip and restart with --force"
    )
    with pytest.raises(DisbackError, match="no checkpoint had been saved yet"):
        check_finite(1, tmp_path, None, grad=torch.tensor(float("-inf")))


def test_a_divergence_on_another_rank_stops_this_one_too(tmp_path):
    with pytest.raises(DisbackError, match="diverged at iteration 2"):
        check_finite(2, tmp_path, None, lambda bad: True, loss=torch.tensor(1.0))
    check_finite(2, tmp_path, None, lambda bad: False, loss=torch.tensor(float("nan")))


def test_what_each_stage_keeps():
    """A backtrack run may be extended (iters), keeps its final state and its metrics log; a
    recording is its path nodes alone."""
    assert (BACKTRACKING.extendable, BACKTRACKING.final_state, BACKTRACKING.metrics_log) == (
        ("iters",),
        True,
        True,
    )
    assert (RECORDING.extendable, RECORDING.final_state, RECORDING.metrics_log) == (
        (),
        False,
        False,
    )


class Notes(SilentReporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


SMALL = dict(iters=20, interval=10, batch=32, save_every=10, log_every=10, device="cpu")


@pytest.fixture
def trajectory(small_trajectory, tmp_path):
    shutil.copytree(small_trajectory, tmp_path / "t")
    return tmp_path / "t"


def test_a_rerun_and_a_forced_one_say_what_they_do(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    run_backtrack(BacktrackConfig(**SMALL), trajectory)
    notes = Notes()
    again = run_backtrack(BacktrackConfig(**SMALL), trajectory, reporter=notes)
    assert notes.notes == [f"{run_dir}: run already complete, nothing to do"]
    assert again.session == {"noop": True, "iterations_run": 0}
    notes = Notes()
    forced = BacktrackConfig(**{**SMALL, "lr_g": 1e-3})
    done = run_backtrack(forced, trajectory, force=True, reporter=notes)
    assert f"--force: discarding the previous run in {run_dir}" in notes.notes
    assert done.session == {"noop": False, "resumed_from": 0, "iterations_run": 20}


def test_another_configuration_or_process_count_is_refused_naming_the_change(trajectory):
    run_backtrack(BacktrackConfig(**SMALL), trajectory)
    run_dir = backtrack_dir(trajectory, "default")
    with pytest.raises(ConfigError) as caught:
        run_backtrack(BacktrackConfig(**{**SMALL, "lr_g": 1e-3, "iters": 30}), trajectory)
    assert str(caught.value) == (
        f"{run_dir} was trained with another configuration (lr_g: 0.0001 -> 0.001); pass "
        "--force to train it again from scratch, or choose another --name"
    )
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["world_size"] = 2
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"\(processes: 2 -> 1 \(global batch\)\)"):
        run_backtrack(BacktrackConfig(**SMALL), trajectory)


def test_a_resumed_run_says_where_it_resumed_and_what_it_removed(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 10}), trajectory)
    stray = run_dir / "checkpoints" / "generator-00000015.safetensors"
    stray.write_bytes(b"left by a killed run")
    notes = Notes()
    run_backtrack(BacktrackConfig(**SMALL), trajectory, reporter=notes)
    assert f"resuming {run_dir} from iteration 10" in notes.notes
    assert f"removed {stray} (written after the last resume point)" in notes.notes
    assert not stray.exists()


def test_a_recording_refused_for_another_configuration_names_its_flags(tmp_path):
    record = RecordConfig(teacher="builtin:ring2d", iters=20, nodes=2, batch=32, device="cpu")
    run_record(record, tmp_path / "t")
    with pytest.raises(ConfigError) as caught:
        run_record(record.model_copy(update={"lr": 0.5}), tmp_path / "t")
    assert str(caught.value).endswith(
        "; pass --force to record it again from scratch, or choose another --out"
    )
    assert f"{tmp_path / 't'} was recorded with another configuration (lr: " in str(caught.value)


def test_a_run_holds_its_lock_under_its_command_while_it_trains(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    seen = []

    def peek():
        holder = json.loads((run_dir / ".lock").read_text())
        seen.append(holder["command"])

    run_backtrack(BacktrackConfig(**SMALL), trajectory, reporter=At(10, peek))
    assert seen == ["disback backtrack"] and not (run_dir / ".lock").exists()


def test_a_new_run_needs_a_folder_of_its_own_and_a_resumed_one_keeps_files_beside_it(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(DisbackError, match=r"holds files disback did not write \(notes\.txt\)"):
        run_backtrack(BacktrackConfig(**SMALL), trajectory)
    (run_dir / "notes.txt").unlink()
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 10}), trajectory)
    (run_dir / "notes.txt").write_text("mine")
    run_backtrack(BacktrackConfig(**SMALL), trajectory)  # extended beside the user's file
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_leftovers_of_a_run_killed_before_it_started_are_removed_and_named(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    (run_dir / "checkpoints").mkdir(parents=True)
    leftover = run_dir / "checkpoints" / ".state-00000010.safetensors.abcdefgh.tmp"
    leftover.write_bytes(b"partial")
    notes = Notes()
    run_backtrack(BacktrackConfig(**SMALL), trajectory, reporter=notes)
    assert f"removed {leftover} (left by a run killed before it started)" in notes.notes


def test_every_change_is_listed_in_a_refusal(trajectory):
    run_backtrack(BacktrackConfig(**SMALL), trajectory)
    with pytest.raises(
        ConfigError, match=r"\(lr_fake: 0\.001 -> 0\.002; lr_g: 0\.0001 -> 0\.001\)"
    ):
        run_backtrack(BacktrackConfig(**{**SMALL, "lr_g": 1e-3, "lr_fake": 2e-3}), trajectory)


def test_a_run_without_room_for_its_checkpoints_says_so_before_training(trajectory, monkeypatch):
    from disback_cli.store import fileio

    monkeypatch.setattr(fileio, "free_bytes", lambda where: 0)
    with pytest.raises(DisbackError, match=r"^not enough disk space for two checkpoints in "):
        run_backtrack(BacktrackConfig(**SMALL), trajectory)


def spoil_state(run_dir) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    path = run_dir / manifest["state"]["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # a finite number changed: the hash no longer matches
    path.write_bytes(bytes(raw))


def test_a_resume_point_is_checked_by_its_hash_unless_told_not_to(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 10}), trajectory)
    spoil_state(run_dir)
    with pytest.raises(DisbackError, match="sha256 does not match the manifest"):
        run_backtrack(BacktrackConfig(**SMALL), trajectory)
    done = run_backtrack(BacktrackConfig(**{**SMALL, "verify": False}), trajectory, force=False)
    assert done.step == 20


def test_a_resumed_run_killed_before_its_next_save_can_resume_again(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 10}), trajectory)

    def crash():
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        run_backtrack(BacktrackConfig(**SMALL), trajectory, reporter=At(20, crash))
    manifest = read_manifest(run_dir, BacktrackManifest)
    assert manifest.step == 10 and (run_dir / manifest.state.file).is_file()
    assert run_backtrack(BacktrackConfig(**SMALL), trajectory).step == 20


def test_training_time_is_counted_from_this_process_start(trajectory):
    done = run_backtrack(BacktrackConfig(**SMALL), trajectory)
    assert 0 < done.elapsed_seconds < 600


def test_a_checkpoint_file_already_gone_is_no_reason_to_fail(trajectory):
    run_dir = backtrack_dir(trajectory, "default")
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 10}), trajectory)
    (run_dir / "checkpoints" / "generator-00000010.safetensors").unlink()
    assert run_backtrack(BacktrackConfig(**SMALL), trajectory).step == 20


class Starts(SilentReporter):
    def __init__(self) -> None:
        self.starts: list[tuple] = []

    def start(self, description: str, total: int, completed: int) -> None:
        self.starts.append((description, total, completed))


def test_progress_starts_at_the_resume_point_of_the_whole_run(trajectory):
    run_backtrack(BacktrackConfig(**{**SMALL, "iters": 10}), trajectory)
    starts = Starts()
    run_backtrack(BacktrackConfig(**SMALL), trajectory, reporter=starts)
    ((description, total, completed),) = starts.starts
    assert (total, completed) == (20, 10) and description.startswith("backtrack")
