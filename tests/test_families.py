"""Teacher families and fake sides are objects that plug in from outside the package: a third
family (rectified flow, `flow_family.py`) and a fake side registered from Python run through every
stage with no change to disback, and families keep what is theirs (their options, refused for
another family's teacher)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from flow_family import FlowFamily, flow_spec, write_flow_teacher

from disback_cli.config import BacktrackConfig
from disback_cli.evaluation.datasets import get_dataset
from disback_cli.evaluation.vectors import mmd2_rbf
from disback_cli.method.fake_sides import FAKE_SIDES, ScoreFake
from disback_cli.method.generator import build_g0
from disback_cli.method.losses import GENERATOR_LOSSES, LOSS_TRAINING_SIGMA, VSDLoss
from disback_cli.method.sampling import one_step_batches
from disback_cli.models.conditioning import condition_source
from disback_cli.models.networks import build_denoiser
from disback_cli.models.teachers import TEACHER_FAMILIES, open_teacher, register_family
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest
from disback_cli.store.samples import read_samples
from disback_cli.store.tensorfile import read_safetensors


@pytest.fixture(scope="module", autouse=True)
def flow_family_registered():
    register_family(FlowFamily)  # the one registry line
    yield
    TEACHER_FAMILIES.remove(FlowFamily)


def test_the_flow_denoiser_of_an_exact_velocity_is_the_exact_denoiser():
    """Gaussian data N(0, s^2): E[v | x_t] is known in closed form; through the family's
    preconditioning it must give EDM's exact denoiser s^2 / (s^2 + sigma^2) x."""
    s = 0.7

    class ExactVelocity(torch.nn.Module):
        def forward(self, x_t, t, class_labels=None):
            t = t.reshape(-1, 1)
            sigma = t / (1 - t)
            x = x_t * (1 + sigma)
            x0 = s**2 / (s**2 + sigma**2) * x
            return (x - x0) / sigma - x0  # E[n | x] - E[x0 | x]

    denoiser = build_denoiser(flow_spec(2, 8, 1))
    denoiser.model = ExactVelocity()
    x, sigma = torch.randn(64, 2), torch.exp(torch.randn(64))
    expected = s**2 / (s**2 + sigma[:, None] ** 2) * x
    torch.testing.assert_close(denoiser(x, sigma), expected, rtol=1e-5, atol=1e-5)


def train_flow_teacher(steps: int = 1500, seed: int = 0) -> torch.nn.Module:
    """A velocity MLP fitted to the ring by flow matching, as its own trainer would."""
    torch.manual_seed(seed)
    net = build_denoiser(flow_spec(2, 64, 2)).model
    ring = get_dataset("ring2d")
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0, _ = ring.sample(256, rng)
        t = torch.rand(256, 1, generator=rng) * 0.98 + 0.01
        noise = torch.randn(256, 2, generator=rng)
        loss = (net((1 - t) * x0 + t * noise, t.flatten()) - (noise - x0)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flow") / "ring.flow"
    config = {"dim": 2, "hidden": 64, "depth": 2, "dataset": "ring2d"}
    return write_flow_teacher(folder, train_flow_teacher(), config)


def test_a_flow_teacher_runs_record_backtrack_and_sample(flow_teacher, tmp_path, cli):
    inspect = json.loads(cli("teacher", "inspect", flow_teacher, "--json").stdout)
    assert inspect["format"] == "rectified-flow folder"
    assert inspect["preconditioning"] == "test.rectified_flow"
    out = tmp_path / "t"
    common = ["--batch", "128", "--seed", "0", "--device", "cpu"]
    record = ["--teacher", flow_teacher, "--out", out, "--iters", "150", "--nodes", "2"]
    done = cli("record", *record, *common)
    assert done.code == 0, done.stderr
    traj = read_manifest(out, TrajectoryManifest)
    assert traj.teacher.network["precond"] == "test.rectified_flow"
    assert min(node.dist_to_teacher for node in traj.nodes[1:]) > 0
    assert traj.nodes[-1].g0_loss < 0.9 * traj.nodes[0].g0_loss  # the path leads to G0
    backtrack = ["-T", out, "--iters", "300", "--interval", "100", "--eval-every", "300"]
    done = cli("backtrack", *backtrack, "--set", "eval_samples=1000", *common)
    assert done.code == 0, done.stderr
    done = cli("sample", "-T", out, "-n", "1000", "--out", tmp_path / "s.npz", "--device", "cpu")
    assert done.code == 0, done.stderr
    samples, meta = read_samples(tmp_path / "s.npz")
    assert meta["teacher_sha256"] == traj.teacher.sha256 and samples.shape == (1000, 2)
    # the distilled generator is far closer to the ring than G0, the flow teacher's one step
    teacher = open_teacher(str(flow_teacher))
    g0, _ = build_g0(traj.g0, teacher, torch.device("cpu"))
    start, _ = next(one_step_batches(g0, range(1000), (2,), condition_source(0), 1000, "cpu"))
    exact, _ = get_dataset("ring2d").sample(1000, torch.Generator().manual_seed(1))
    assert mmd2_rbf(samples, exact) < 0.5 * mmd2_rbf(start, exact)


def test_a_flow_teacher_refuses_another_familys_options(flow_teacher, tmp_path, cli):
    refused = cli("record", "--teacher", flow_teacher, "--out", tmp_path / "t", "--lora-rank", "4")
    assert refused.code == 2 and "--lora-rank is for text-to-image teachers" in refused.stderr
    assert not (tmp_path / "t").exists()


class FrozenFake(ScoreFake):
    """A fake side that never trains (an example, not a method): the fake score stays node N."""

    @property
    def step(self):
        def frozen(fake, optimizer, generator, shape, conditions, levels, rng, clip, ex):
            return torch.zeros(()), torch.zeros(())

        return frozen


class VSDFrozen(VSDLoss):
    fake_side = "frozen"


def test_a_fake_side_registered_from_python_is_used(tmp_path, small_trajectory, monkeypatch):
    ring_trajectory = tmp_path / "t"
    shutil.copytree(small_trajectory, ring_trajectory)
    monkeypatch.setitem(FAKE_SIDES, "frozen", FrozenFake)
    monkeypatch.setitem(GENERATOR_LOSSES, "vsd-frozen", VSDFrozen)
    monkeypatch.setitem(LOSS_TRAINING_SIGMA, "vsd-frozen", "lognormal")
    cfg = BacktrackConfig(
        loss="vsd-frozen", iters=10, interval=5, batch=32, save_every=10, log_every=5
    )
    run_backtrack(cfg, ring_trajectory, "frozen")
    run = ring_trajectory / "backtrack" / "frozen"
    manifest = read_manifest(run, BacktrackManifest)
    assert manifest.config.loss == "vsd-frozen" and manifest.step == 10
    state, _, _ = read_safetensors(run / manifest.state.file)
    last = read_manifest(ring_trajectory, TrajectoryManifest).nodes[-1]
    node, _, _ = read_safetensors(ring_trajectory / last.file)
    fake = {k.removeprefix("module.fake."): v for k, v in state.items() if ".fake." in f".{k}"}
    assert fake and all(torch.equal(fake[k], node[k]) for k in fake)  # never stepped
