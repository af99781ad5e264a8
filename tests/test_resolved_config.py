"""Settings that depend on the teacher, the loss or the student are resolved before a run starts,
recorded in the manifest with where they came from, and mismatches are refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import checkout_env
from disback_cli.config.teacher_kinds import SIZE_DEFAULTS
from disback_cli.errors import DisbackError
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.teachers import open_teacher
from disback_cli.stages.record import LossMeans
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest

RING = [
    "--teacher",
    "builtin:ring2d",
    "--iters",
    "20",
    "--nodes",
    "2",
    "--batch",
    "32",
    "--device",
    "cpu",
]
QUICK = [
    "--iters",
    "2",
    "--batch",
    "16",
    "--log-every",
    "1",
    "--save-every",
    "0",
    "--device",
    "cpu",
]


def test_backtrack_defaults_come_from_the_teacher_family_and_are_recorded(
    small_trajectory, cli, tmp_path
):
    trajectory = tmp_path / "t"
    shutil.copytree(small_trajectory, trajectory)
    assert cli("backtrack", "-T", trajectory, *QUICK, "--lr-fake", "5e-4").code == 0
    manifest = read_manifest(backtrack_dir(trajectory, "default"), BacktrackManifest)
    cfg, sources = manifest.config, manifest.config_sources
    assert (cfg.lr_g, cfg.ema_halflife_kimg) == (1e-4, 10.0)  # the ring is a vector teacher
    assert sources["lr_g"] == sources["ema_halflife_kimg"] == "default for vector teachers"
    assert (cfg.lr_fake, sources["lr_fake"]) == (5e-4, "flag")
    ring = open_teacher("builtin:ring2d").train_sigma
    assert (cfg.p_mean, sources["p_mean"]) == (ring["p_mean"], "teacher")
    assert (cfg.dsm_sigma, sources["dsm_sigma"]) == ("lognormal", "loss vsd")
    assert sources["iters"] == "flag" and sources["interval"] == "default"
    assert set(sources) == set(type(cfg).model_fields)


def test_recipe_values_are_recorded_as_such(small_trajectory, cli, tmp_path):
    trajectory = tmp_path / "t"
    shutil.copytree(small_trajectory, trajectory)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[backtrack]\nlr_g = 3e-5\niters = 5\n")
    assert cli("backtrack", "-T", trajectory, "--config", recipe, *QUICK).code == 0
    sources = read_manifest(backtrack_dir(trajectory, "default"), BacktrackManifest).config_sources
    assert sources["lr_g"] == "recipe" and sources["iters"] == "flag"  # the flag overrode it


def test_help_shows_the_defaults_of_each_teacher_family():
    text = subprocess.run(
        [sys.executable, "-m", "disback_cli", "backtrack", "--help"],
        env=checkout_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    text = " ".join(text.split())  # help wraps descriptions to the width
    assert "default by teacher: 0.0001 vector, 5e-05 image, 1e-05 edm" in text
    assert "default by teacher: 10 vector, 10 image, 500 edm" in text
    assert SIZE_DEFAULTS["lr_g"]["edm"] == 1e-5  # SiD's generator lr on EDM teachers


def test_a_students_own_sigma_init_is_used_and_a_conflicting_flag_refused(cli, tmp_path):
    teacher = open_teacher("builtin:ring2d")
    student = tmp_path / "student.safetensors"
    save_denoiser(student, teacher.denoiser, teacher.spec, {"role": "generator", "sigma_init": 1.5})
    refused = cli(
        "record", *RING, "--student", student, "--sigma-init", "2.5", "--out", tmp_path / "a"
    )
    assert refused.code == 2 and "conflicts with the student's own sigma_init 1.5" in refused.stderr
    assert not (tmp_path / "a").exists()
    assert cli("record", *RING, "--student", student, "--out", tmp_path / "b").code == 0
    manifest = read_manifest(tmp_path / "b", TrajectoryManifest)
    assert manifest.g0.sigma_init == 1.5
    assert manifest.config_sources["sigma_init"] == "student"
    same = cli(
        "record", *RING, "--student", student, "--sigma-init", "1.5", "--out", tmp_path / "c"
    )
    assert same.code == 0


def test_a_path_recorded_at_other_noise_levels_is_refused_unless_forced(
    small_trajectory, cli, tmp_path
):
    trajectory = tmp_path / "t"
    shutil.copytree(small_trajectory, trajectory)
    refused = cli("backtrack", "-T", trajectory, *QUICK, "--loss", "dmd")
    assert refused.code == 2
    assert "recorded at lognormal noise levels, this run trains at karras" in refused.stderr
    assert not backtrack_dir(trajectory, "default").exists()
    # the path's own noise levels, chosen explicitly
    assert (
        cli("backtrack", "-T", trajectory, *QUICK, "--loss", "dmd", "--dsm-sigma", "lognormal").code
        == 0
    )
    forced = cli("backtrack", "-T", trajectory, *QUICK, "--loss", "dmd", "--name", "f", "--force")
    assert forced.code == 0 and "--force: " in forced.stderr
    assert read_manifest(backtrack_dir(trajectory, "f"), BacktrackManifest).config.dsm_sigma == (
        "karras"
    )


def test_a_path_recorded_for_dmd_trains_its_nodes_at_karras_levels(cli, tmp_path):
    assert cli("record", *RING, "--loss", "dmd", "--out", tmp_path / "t").code == 0
    manifest = read_manifest(tmp_path / "t", TrajectoryManifest)
    assert manifest.config.dsm_sigma == "karras" and manifest.config_sources["dsm_sigma"] == (
        "loss dmd"
    )
    assert cli("backtrack", "-T", tmp_path / "t", *QUICK, "--loss", "dmd").code == 0


def test_nodes_record_their_fit_to_g0(small_trajectory):
    nodes = read_manifest(small_trajectory, TrajectoryManifest).nodes
    losses = [n.g0_loss for n in nodes]
    assert all(loss is not None and loss > 0 for loss in losses)
    assert losses[-1] < 0.95 * losses[0]  # the recording moved toward G0
    assert nodes[0].train_loss is None and all(n.train_loss > 0 for n in nodes[1:])


@pytest.mark.parametrize("lr, warned", [("1e-9", True), ("1e-3", False)])
def test_a_path_that_barely_moves_toward_g0_is_reported(cli, tmp_path, lr, warned):
    result = cli("record", *RING, "--lr", lr, "--out", tmp_path / "t", "--json")
    assert result.code == 0
    assert ("is not clearly closer to G0 than the teacher" in result.stderr) is warned
    nodes = json.loads(result.stdout)["nodes"]
    assert (nodes[-1]["g0_loss"] > 0.95 * nodes[0]["g0_loss"]) is warned


@pytest.mark.parametrize(
    "state, total, count",
    [({}, 0.0, 0), ({"total": 3.0, "count": 2}, 3.0, 2), ({"total": 3, "count": 2}, 3.0, 2)],
)
def test_loss_means_resume_from_a_state_file(state, total, count):
    means = LossMeans()
    means.load_state_dict(state, "state.safetensors")
    assert (means.total, means.count) == (total, count)
    means.add(1.0)
    assert means.take() == (total + 1.0) / (count + 1) and means.take() is None


@pytest.mark.parametrize(
    "state",
    [
        [1, 2],
        {"total": "1", "count": 1},
        {"total": 1.0, "count": -1},
        {"total": 1.0, "count": 1.5},
        {"total": float("nan"), "count": 1},
        {"total": -1.0, "count": 1},
        {"total": 1.0},
        {"total": 1.0, "count": 1, "extra": 0},
        {"total": 1.0, "count": True},
    ],
)
def test_malformed_loss_means_in_a_state_file_are_refused(state):
    with pytest.raises(DisbackError, match="malformed loss means"):
        LossMeans().load_state_dict(state, "state.safetensors")
