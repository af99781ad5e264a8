"""Teachers with dropout (EDM's CIFAR-10 U-Nets use 0.13): dropout may only act where the
reference implementations let it act, in the networks being trained, never in a score difference
or in the samples the fake score learns from."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.method.dsm import denoising_step
from disback_cli.method.generator import OneStepGenerator
from disback_cli.method.noise import TrainingSigma
from disback_cli.models.conditioning import condition_source
from disback_cli.models.denoiser_files import load_denoiser, save_denoiser
from disback_cli.models.networks import NetworkSpec, build_denoiser, network_dropout
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest

DROPOUT = 0.13
SPEC = NetworkSpec(
    arch="SongUNet",
    data_shape=(3, 8, 8),
    label_dim=4,
    arch_kwargs=dict(
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        dropout=DROPOUT,
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    ),
)


def dropout_network(seed: int = 0) -> torch.nn.Module:
    """Random weights, zero-initialised output layers included, so every block matters."""
    torch.manual_seed(seed)
    net = build_denoiser(SPEC)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return net


@pytest.fixture(scope="module")
def dropout_trajectory(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dropout")
    teacher = folder / "teacher.safetensors"
    info = {"role": "teacher", "train_sigma": {"p_mean": -1.2, "p_std": 1.2}}
    save_denoiser(teacher, dropout_network(), SPEC, info)
    run_record(
        RecordConfig(teacher=str(teacher), iters=4, nodes=2, batch=8, device="cpu"), folder / "t"
    )
    return folder / "t"


def test_record_trains_at_the_teachers_own_dropout_and_says_so(dropout_trajectory):
    manifest = read_manifest(dropout_trajectory, TrajectoryManifest)
    assert manifest.config.dropout == DROPOUT
    assert manifest.config_sources["dropout"] == "teacher"
    node = load_denoiser(dropout_trajectory / manifest.nodes[1].file)
    assert network_dropout(node.denoiser) == DROPOUT


@pytest.mark.parametrize("loss", ["vsd", "dmd", "sid"])
def test_fake_equal_to_target_gives_exactly_zero_gap_and_gradient(dropout_trajectory, loss):
    """--no-trajectory starts with fake = target = teacher: whatever dropout does in the networks
    being trained, the first generator update must be exactly zero."""
    cfg = BacktrackConfig(
        no_trajectory=True, loss=loss, iters=1, batch=8, log_every=1, save_every=0, device="cpu"
    )
    run_backtrack(cfg, dropout_trajectory, name=f"zero-{loss}")
    run = backtrack_dir(dropout_trajectory, f"zero-{loss}")
    (line,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert line["score_gap"] == 0.0
    assert line["grad_norm_g"] == 0.0
    assert line["loss_fake"] > 0  # the fake score did train: the run is not vacuous


def test_the_fake_score_learns_from_generator_samples_drawn_without_dropout():
    """A generator with dropout in training mode gives the fake score the samples `sample`
    would draw: the same update as from the generator in eval mode."""
    generator = OneStepGenerator(dropout_network(1), 2.5).train()
    results = []
    for mode in ("train", "eval"):
        generator.train(mode == "train")
        fake = copy.deepcopy(dropout_network(2)).train()
        optimizer = torch.optim.Adam(fake.parameters(), lr=1e-3)
        rng = torch.Generator().manual_seed(0)
        torch.manual_seed(0)  # the fake score's own dropout draws the same masks in both runs
        denoising_step(
            fake,
            optimizer,
            generator,
            (8, *SPEC.data_shape),
            condition_source(SPEC.label_dim),
            TrainingSigma("lognormal"),
            rng,
        )
        results.append(torch.cat([p.detach().flatten() for p in fake.parameters()]))
    assert generator.training is False  # restored to what it was (eval, the last mode set)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_a_run_resumed_between_saves_takes_the_same_dropout_masks(dropout_trajectory):
    """Dropout draws from the global torch stream, which a resume state must carry: a run
    stopped at iteration 1 and extended to 2 ends with the same weights as one run to 2. (Only
    two iterations: from the third on, these random-weight networks hit denormal floats, which
    make the CPU some 40x slower.)"""

    def run(name: str, iters: int) -> BacktrackManifest:
        cfg = BacktrackConfig(iters=iters, batch=8, log_every=1, save_every=1, device="cpu")
        run_backtrack(cfg, dropout_trajectory, name=name)
        return read_manifest(backtrack_dir(dropout_trajectory, name), BacktrackManifest)

    whole = run("whole", 2)
    run("split", 1)
    torch.rand(1000)  # the resume may not depend on what ran in between
    split = run("split", 2)
    assert split.generator.sha256 == whole.generator.sha256
    assert split.state.sha256 == whole.state.sha256
