"""The two seams the next teacher families plug into: conditions other than class labels pass
through every stage unopened, and a network that is not one of ours (a registered adapter) is a
teacher, a path node and a generator like any other."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.method.dsm import denoising_step
from disback_cli.method.generator import OneStepGenerator
from disback_cli.method.losses import VSDLoss, generator_step
from disback_cli.method.noise import TrainingSigma
from disback_cli.method.sampling import edm_sampler, seeded_noise
from disback_cli.models.conditioning import Conditioning
from disback_cli.models.denoiser_files import load_denoiser, save_denoiser
from disback_cli.models.networks import (
    ARCHITECTURES,
    NetworkSpec,
    build_denoiser,
    register_architecture,
)
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.manifests import BacktrackManifest, read_manifest


class Context:
    """A condition that is not a class label: a per-sample 3-vector under the name `context`
    (as a text encoder's embedding would be)."""

    def draw(self, n: int, rng: torch.Generator, device) -> Conditioning:
        return Conditioning({"context": torch.rand(n, 3, generator=rng, device=device)})

    def of_seed(self, rng: torch.Generator) -> Conditioning:
        return Conditioning({"context": torch.rand(1, 3, generator=rng)})

    def labels(self, cond: Conditioning):
        return None


class ForeignNet(nn.Module):
    """Stands in for a network of another library: its own call (sample, timestep, context=...)
    and parameter names, and it needs its `context`."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1 + 3, width), nn.SiLU(), nn.Linear(width, dim))
        self.seen: list[torch.Tensor] = []

    def forward(self, sample, timestep, context):
        self.seen.append(context.detach().clone())
        return self.body(torch.cat([sample, timestep.reshape(-1, 1), context], dim=1))


class ForeignAdapter(nn.Module):
    """The adapter a family registers: our raw-network call F(x, c_noise, class_labels, **cond)
    mapped onto the foreign one."""

    def __init__(self, data_shape, label_dim=0, width=16) -> None:
        super().__init__()
        self.net = ForeignNet(math.prod(data_shape), width)

    def forward(self, x, noise_labels, class_labels=None, context=None):
        if context is None:  # unconditional use (a teacher without a context source)
            context = torch.zeros(x.shape[0], 3, device=x.device)
        return self.net(x, noise_labels, context=context)


ADAPTER = "test.ForeignAdapter"
if ADAPTER not in ARCHITECTURES:
    register_architecture(ADAPTER, ForeignAdapter)
SPEC = NetworkSpec(arch=ADAPTER, arch_kwargs={"width": 16}, precond="vp", data_shape=(2,))


def foreign_denoiser(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_denoiser(SPEC)


def test_a_registered_name_is_taken_once():
    with pytest.raises(ValueError, match="taken"):
        register_architecture(ADAPTER, ForeignAdapter)
    with pytest.raises(ValueError, match="taken"):
        register_architecture("mlp", ForeignAdapter)


def test_training_steps_pass_each_rows_condition_to_the_network():
    """The DSM step and the generator step hand the network exactly the context the source drew
    for each row, on every call (G's, the fake's and the target's)."""
    fake, target = foreign_denoiser(1), foreign_denoiser(2).eval().requires_grad_(False)
    generator = OneStepGenerator(foreign_denoiser(3), 2.5)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-3)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
    shape, source = (8, 2), Context()

    rng = torch.Generator().manual_seed(7)
    denoising_step(fake, opt_f, generator, shape, source, TrainingSigma("lognormal"), rng)
    replay = torch.Generator().manual_seed(7)
    torch.randn(shape, generator=replay)  # z comes first, then the conditions
    drawn = source.draw(8, replay, "cpu")["context"]
    assert [len(c) for c in generator.denoiser.model.net.seen] == [8]
    assert torch.equal(generator.denoiser.model.net.seen[0], drawn)
    assert torch.equal(fake.model.net.seen[0], drawn)

    rng = torch.Generator().manual_seed(11)
    generator_step(generator, opt_g, VSDLoss(-1.2, 1.2), fake, target, shape, source, rng)
    replay = torch.Generator().manual_seed(11)
    torch.randn(shape, generator=replay)
    drawn = source.draw(8, replay, "cpu")["context"]
    for network in (generator.denoiser, fake, target):
        assert torch.equal(network.model.net.seen[-1], drawn)


def test_sampling_conditions_come_from_each_seed_alone():
    z, cond = seeded_noise([4, 5, 6], (2,), Context())
    z_alone, cond_alone = seeded_noise([6], (2,), Context())
    assert torch.equal(z[2:], z_alone) and torch.equal(cond["context"][2:], cond_alone["context"])
    teacher = foreign_denoiser(4).eval()
    teacher.model.net.seen.clear()
    edm_sampler(teacher, z, cond, num_steps=4)
    assert len(teacher.model.net.seen) == 2 * 4 - 1  # Heun: two evaluations per step but the last
    assert all(torch.equal(seen, cond["context"]) for seen in teacher.model.net.seen)


def test_a_foreign_network_is_a_teacher_path_node_and_generator(tmp_path):
    """Adapter + weights: record and backtrack on a teacher built by the registered adapter;
    every file names the adapter, and loads back into it with the same weights."""
    teacher = foreign_denoiser(5)
    teacher_file = tmp_path / "foreign.safetensors"
    save_denoiser(teacher_file, teacher, SPEC, {"role": "teacher"})
    out = tmp_path / "t"
    traj = run_record(
        RecordConfig(teacher=str(teacher_file), iters=20, nodes=2, batch=16, lr=1e-3, device="cpu"),
        out,
    )
    assert [n.index for n in traj.nodes] == [0, 1, 2]
    assert traj.nodes[2].dist_to_teacher > traj.nodes[1].dist_to_teacher > 0
    node = load_denoiser(out / traj.nodes[2].file)
    assert node.spec == SPEC and isinstance(node.denoiser.model, ForeignAdapter)
    assert not torch.equal(node.denoiser.model.net.body[0].weight, teacher.model.net.body[0].weight)

    cfg = BacktrackConfig(iters=20, interval=5, batch=16, save_every=10, log_every=5, device="cpu")
    run = run_backtrack(cfg, out)
    assert run.status == "complete" and run.step == 20
    manifest = read_manifest(out / "backtrack" / "default", BacktrackManifest)
    generator = load_denoiser(out / "backtrack" / "default" / manifest.generator_ema.file)
    assert generator.spec == SPEC and generator.info["role"] == "generator"
    assert bool(torch.isfinite(generator.denoiser(torch.randn(4, 2), 2.5)).all())
