"""A teacher shaped like the ones users distill: EDM's class-conditional CIFAR-10 DDPM++ (3x32x32,
10 classes, dropout 0.13, augmentation labels, VP preconditioning) with narrow channels, read
from an EDM-format pickle, through record -> backtrack (every loss) -> sample."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from edm_fixtures import tiny_network, write_edm_snapshot

from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest

CIFAR_DROPOUT = 0.13
QUICK = ["--batch", "8", "--log-every", "1", "--save-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    net, init_kwargs = tiny_network(
        "ddpmpp",
        "vp",
        label_dim=10,
        augment_dim=9,
        resolution=32,
        channel_mult=[1, 2, 2],
        attn_resolutions=[16],
        dropout=CIFAR_DROPOUT,
    )
    return write_edm_snapshot(folder / "edm-cifar10-like.pkl", net, init_kwargs), folder


@pytest.fixture(scope="module")
def recorded(cifar_like, cli_module):
    teacher, folder = cifar_like
    result = cli_module(
        "record",
        "--teacher",
        teacher,
        "--out",
        folder / "t",
        "--iters",
        "6",
        "--nodes",
        "3",
        "--batch",
        "8",
        "--device",
        "cpu",
        "--json",
    )
    assert result.code == 0, result.stderr
    return folder / "t", result


def test_recording_resolves_edm_defaults_and_measures_the_path(recorded):
    trajectory, result = recorded
    manifest = read_manifest(trajectory, TrajectoryManifest)
    cfg, sources = manifest.config, manifest.config_sources
    assert (cfg.dropout, sources["dropout"]) == (CIFAR_DROPOUT, "teacher")
    assert (cfg.lr, sources["lr"]) == (1e-5, "default for edm teachers")
    assert (cfg.dsm_sigma, cfg.p_mean, cfg.p_std) == ("lognormal", -1.2, 1.2)
    distances = [n.dist_to_teacher for n in manifest.nodes]
    assert distances[0] == 0 and all(b > a for a, b in itertools.pairwise(distances))
    assert all(math.isfinite(n.g0_loss) and n.g0_loss > 0 for n in manifest.nodes)
    # six iterations at the EDM learning rate barely move the path: that is reported
    assert "is not clearly closer to G0 than the teacher" in result.stderr
    assert json.loads(result.stdout)["warnings"]


@pytest.mark.parametrize("loss", ["vsd", "dmd", "sid"])
def test_every_loss_starts_from_an_exact_zero_and_trains_finite(recorded, cli_module, loss):
    trajectory, _ = recorded
    zero = cli_module(
        "backtrack",
        "-T",
        trajectory,
        "--no-trajectory",
        "--loss",
        loss,
        "--iters",
        "1",
        "--name",
        f"zero-{loss}",
        *QUICK,
    )
    assert zero.code == 0, zero.stderr
    (line,) = _metrics(trajectory, f"zero-{loss}")
    assert line["score_gap"] == 0.0 and line["grad_norm_g"] == 0.0

    # dmd on this log-normal path: its own noise levels chosen explicitly
    levels = ["--dsm-sigma", "lognormal"] if loss == "dmd" else []
    run = cli_module(
        "backtrack",
        "-T",
        trajectory,
        "--loss",
        loss,
        "--iters",
        "3",
        "--interval",
        "1",
        "--name",
        loss,
        *levels,
        *QUICK,
    )
    assert run.code == 0, run.stderr
    lines = _metrics(trajectory, loss)
    assert [x["target_node"] for x in lines] == [2, 1, 0]
    assert all(math.isfinite(v) for x in lines for k, v in x.items() if k != "target_node")
    manifest = read_manifest(backtrack_dir(trajectory, loss), BacktrackManifest)
    cfg, sources = manifest.config, manifest.config_sources
    assert (cfg.lr_g, cfg.lr_fake, cfg.ema_halflife_kimg) == (1e-5, 1e-5, 500.0)
    assert sources["lr_g"] == "default for edm teachers"


def test_samples_of_the_distilled_generator_are_finite_images(recorded, cli_module, tmp_path):
    trajectory, _ = recorded
    out = tmp_path / "s.npz"
    result = cli_module(
        "sample",
        "-T",
        trajectory,
        "--name",
        "vsd",
        "-n",
        "4",
        "--format",
        "npz",
        "--out",
        out,
        "--device",
        "cpu",
    )
    assert result.code == 0, result.stderr
    with np.load(out) as data:
        images = data["images"]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    assert len(np.unique(images)) > 10  # not a constant (e.g. NaN cast to 0) image


def _metrics(trajectory, name) -> list[dict]:
    text = (backtrack_dir(trajectory, name) / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]
