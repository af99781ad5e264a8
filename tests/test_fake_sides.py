"""The two fake sides one by one (`method/fake_sides.py`): where the fake score starts and what
it is checked against, and DiffRatio's ratio side (its refusals, its data, its network, its
checkpoint file). The loop that drives them is covered end to end in test_backtrack.py and
test_diffratio.py."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from disback_cli.config import BacktrackConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.method.fake_sides import NoTargets, RatioFake, ScoreFake
from disback_cli.method.generator import build_g0
from disback_cli.models.path_nodes import load_path_node
from disback_cli.models.ratio import build_ratio, load_ratio, ratio_spec_for
from disback_cli.runtime.parallel import Execution
from disback_cli.stages.trajectory import open_trajectory
from disback_cli.store.fileio import sha256_file

CPU = torch.device("cpu")
EX = Execution(CPU)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# -- the score side -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_trajectory", "warm_fake"), [(False, False), (True, False), (True, True)]
)
def test_the_fake_score_starts_as_an_own_copy_of_node_n_or_the_teacher(
    small_trajectory, no_trajectory, warm_fake
):
    """On the path at node N; without it at the teacher, or at node N with --warm-fake."""
    traj, teacher = open_trajectory(small_trajectory, None, CPU)
    teacher_weights = teacher.denoiser
    cfg = BacktrackConfig(no_trajectory=no_trajectory, warm_fake=warm_fake)
    fake, targets = ScoreFake().build(cfg, small_trajectory, traj, teacher, None, EX)
    try:
        at_teacher = no_trajectory and not warm_fake
        start = teacher_weights if at_teacher else targets.at(traj.last_node)
        others = [targets.at(i) for i in range(traj.last_node + 1)]
        assert same_weights(fake, start) and fake is not start
        assert sum(same_weights(fake, node) for node in others) == 1  # not a neighbour
        assert teacher.denoiser is None  # the targets hold the teacher's weights now
    finally:
        targets.close()


def test_the_fake_scores_node_is_checked_by_its_sha256_unless_told_not_to(
    small_trajectory, tmp_path
):
    trajectory = tmp_path / "t"
    shutil.copytree(small_trajectory, trajectory)
    traj, _ = open_trajectory(trajectory, None, CPU)
    node_file = trajectory / traj.nodes[traj.last_node].file
    raw = bytearray(node_file.read_bytes())
    raw[-1] ^= 0x01  # the last float's exponent: still finite, another number
    node_file.write_bytes(bytes(raw))
    for verify in (True, False):
        _, teacher = open_trajectory(trajectory, None, CPU, verify=False)
        cfg = BacktrackConfig(verify=verify)
        if verify:
            with pytest.raises(DisbackError, match="sha256"):
                ScoreFake().build(cfg, trajectory, traj, teacher, None, EX)
        else:
            fake, targets = ScoreFake().build(cfg, trajectory, traj, teacher, None, EX)
            spoiled = load_path_node(trajectory, traj, traj.last_node, teacher, CPU, verify=False)
            assert same_weights(fake, spoiled)
            targets.close()


def test_the_score_side_adds_no_files_and_no_data(tmp_path):
    side = ScoreFake()
    assert side.save(tmp_path, 5, torch.nn.Linear(1, 1), {}, EX) == {}
    assert side.data_record is None
    assert list(tmp_path.iterdir()) == []


# -- the ratio side -------------------------------------------------------------------------


def ratio_config(**options) -> BacktrackConfig:
    return BacktrackConfig(**{"loss": "diffratio", "data": "builtin:ring2d", **options})


def test_diffratio_takes_no_path_and_records_why(small_trajectory):
    _, teacher = open_trajectory(small_trajectory, None, CPU)
    update, sources = {}, {}
    RatioFake().resolve(ratio_config(), teacher, update, sources)
    measured = "default for --loss diffratio (measured)"
    assert update == {
        "no_trajectory": True,
        "lr_ratio": 1e-3,
        "lr_fake": None,
        "fake_steps": 5,
        "ratio_weighting": "score",
    }
    assert sources == {
        "no_trajectory": "loss diffratio",
        "lr_ratio": "default for a ratio network on vectors (trained from scratch)",
        "lr_fake": "not used by --loss diffratio",
        "fake_steps": measured,
        "ratio_weighting": measured,
    }
    update, sources = {}, {}
    given = ratio_config(
        no_trajectory=True, lr_ratio=3e-4, fake_steps=2, ratio_weighting="denoiser"
    )
    RatioFake().resolve(given, teacher, update, sources)
    assert update == {"lr_fake": None} and sources == {"lr_fake": "not used by --loss diffratio"}


def test_a_ratio_network_trains_at_a_from_scratch_rate_whatever_the_teachers_size():
    """Not the fake score's rate: that one fine-tunes a teacher copy (1e-5 for EDM U-Nets)."""
    family = SimpleNamespace(supports_real_data=True)
    for shape, rate in (((2,), 1e-3), ((3, 64, 64), 1e-4)):
        teacher = SimpleNamespace(family=family, spec=SimpleNamespace(data_shape=shape))
        update: dict = {}
        RatioFake().resolve(ratio_config(lr_fake=None), teacher, update, {})
        assert update["lr_ratio"] == rate
        resolved = ratio_config(**update)
        assert RatioFake().learning_rate(resolved) == rate
    assert ScoreFake().learning_rate(BacktrackConfig(lr_fake=2e-5, lr_ratio=None)) == 2e-5


@pytest.mark.parametrize(
    ("options", "supports_data", "message"),
    [
        (
            {"data": None},
            True,
            "--loss diffratio learns from real data: give --data (builtin:NAME, an image folder "
            "or an EDM dataset zip)",
        ),
        ({}, False, "--loss diffratio is not available for test teachers"),
        (
            {"mismatch_every": 10},
            True,
            "--mismatch-every needs a target and a fake score; diffratio has neither",
        ),
    ],
)
def test_diffratio_refuses_what_it_cannot_do(options, supports_data, message):
    family = SimpleNamespace(supports_real_data=supports_data, description="test teachers")
    with pytest.raises(ConfigError) as caught:
        RatioFake().resolve(ratio_config(**options), SimpleNamespace(family=family), {}, {})
    assert str(caught.value) == message


def test_the_ratio_side_opens_its_data_for_the_teachers_shape_and_classes(small_trajectory):
    _, teacher = open_trajectory(small_trajectory, None, CPU)
    side = RatioFake()
    side.open_inputs(ratio_config(), teacher)
    assert side.data_record.source == "builtin:ring2d" and side.data_record.count == 0
    assert side.data_record.sha256 == side.data.ref.sha256
    x, _ = side.data.draw(4, torch.Generator().manual_seed(0), CPU)
    assert x.shape == (4, 2)
    digits = SimpleNamespace(spec=SimpleNamespace(data_shape=(1, 8, 8), label_dim=10))
    side.open_inputs(ratio_config(data="builtin:digits"), digits)
    _, cond = side.data.draw(4, torch.Generator().manual_seed(0), CPU)
    assert cond["class_labels"].shape == (4, 10)
    with pytest.raises(ConfigError, match="10 classes, the teacher has 3"):
        side.open_inputs(
            ratio_config(data="builtin:digits"),
            SimpleNamespace(spec=SimpleNamespace(data_shape=(1, 8, 8), label_dim=3)),
        )


@pytest.mark.parametrize(("width", "depth"), [(None, None), (12, 2)])
def test_the_ratio_network_is_built_from_the_run_seed_and_its_options(
    small_trajectory, width, depth
):
    traj, teacher = open_trajectory(small_trajectory, None, CPU)
    generator, _ = build_g0(traj.g0, teacher, CPU)
    cfg = ratio_config(seed=5, ratio_width=width, ratio_depth=depth)
    ratio, targets = RatioFake().build(cfg, small_trajectory, traj, teacher, generator, EX)
    expected = ratio_spec_for((2,), 0, generator.denoiser.sigma_data, width, depth)
    assert ratio.spec == expected and ratio.spec.width == (width or 64)
    assert same_weights(ratio, build_ratio(expected, seed=5))
    assert not same_weights(ratio, build_ratio(expected, seed=6))
    assert isinstance(targets, NoTargets) and targets.at(3) is None
    assert teacher.denoiser is None  # nothing queries the teacher's score: let it go


def test_the_ratio_network_is_saved_as_the_verifier_of_its_step(tmp_path):
    spec = ratio_spec_for((2,), 0, 0.5, None, None)
    network = build_ratio(spec, seed=1)
    (tmp_path / "checkpoints").mkdir()
    files = RatioFake().save(tmp_path, 12, network, {"teacher_sha256": "ab"}, EX)
    assert list(files) == ["ratio"]
    ref = files["ratio"]
    assert ref.file == "checkpoints/ratio-00000012.safetensors"
    assert ref.sha256 == sha256_file(tmp_path / ref.file)
    loaded, info = load_ratio(tmp_path / ref.file, CPU, ref.sha256)
    assert info == {"role": "verifier", "step": 12, "teacher_sha256": "ab"}
    assert same_weights(loaded, network)
