"""The pipeline on an image teacher (a tiny EDM pickle): record -> backtrack -> sample PNG/npz."""

import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from edm_fixtures import tiny_network, write_edm_snapshot

from conftest import file_digests
from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.models.networks import set_dropout
from disback_cli.models.networks.layers import UNetBlock
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.images import encode_png, grid, to_uint8
from disback_cli.store.layout import backtrack_dir

BACKTRACK = dict(iters=6, interval=2, batch=4, save_every=2, log_every=2, device="cpu")


def decode_png(data: bytes) -> np.ndarray:
    """Minimal decoder for the PNGs we write (8-bit, filter 0, one IDAT)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    channels = {0: 1, 2: 3}[colour]
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    raw = np.frombuffer(zlib.decompress(data[start : start + length]), np.uint8)
    rows = raw.reshape(height, 1 + width * channels)
    assert depth == 8 and not rows[:, 0].any()
    return rows[:, 1:].reshape(height, width, channels)


def test_png_round_trip_and_uint8_convention():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    images = to_uint8(x)
    assert images.shape == (1, 2, 2, 3) and images[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(rgb)), rgb)
    tiled = grid(np.stack([rgb] * 5), columns=3)
    assert tiled.shape == (2 * 6 + 1, 3 * 8 + 1, 3)


@pytest.fixture(scope="module")
def image_trajectory(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    net, init_kwargs = tiny_network("ddpmpp", "edm", label_dim=10, augment_dim=9)
    pkl = write_edm_snapshot(root / "tiny-edm.pkl", net, init_kwargs)
    out = root / "t"
    run_record(RecordConfig(teacher=str(pkl), iters=4, nodes=2, batch=4, device="cpu"), out)
    return out


def test_record_backtrack_sample_png_grid_end_to_end(cli, tmp_path):
    net, init_kwargs = tiny_network("ddpmpp", "edm", label_dim=10, augment_dim=9)
    pkl = write_edm_snapshot(tmp_path / "tiny-edm.pkl", net, init_kwargs)
    trajectory = tmp_path / "t"
    result = cli(
        "record",
        "--teacher",
        pkl,
        "--out",
        trajectory,
        "--iters",
        "4",
        "--nodes",
        "2",
        "--batch",
        "4",
        "--device",
        "cpu",
    )
    assert result.code == 0, result.stderr
    manifest = json.loads((trajectory / "manifest.json").read_text())
    assert manifest["teacher"]["network"]["arch"] == "SongUNet"
    assert [n["step"] for n in manifest["nodes"]] == [0, 2, 4]
    result = cli(
        "backtrack",
        "-T",
        trajectory,
        "--iters",
        "6",
        "--interval",
        "2",
        "--batch",
        "4",
        "--save-every",
        "2",
        "--log-every",
        "2",
        "--device",
        "cpu",
    )
    assert result.code == 0, result.stderr
    result = cli(
        "sample", "-T", trajectory, "--seeds", "998-1001", "--format", "png", "--grid", "--json"
    )
    assert result.code == 0, result.stderr
    out = backtrack_dir(trajectory, "default") / "samples"
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert names == [
        "00000/img00000998.png",
        "00000/img00000999.png",
        "00001/img00001000.png",
        "00001/img00001001.png",
    ]
    assert decode_png((out / names[0]).read_bytes()).shape == (8, 8, 3)
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert [entry[0] for entry in labels] == names and all(0 <= y < 10 for _, y in labels)
    # 2 x 2 tiles of 8 pixels with 1-pixel borders (19 pixels), enlarged 27 times to reach 512,
    # beside the output folder
    grid_png = decode_png((out.parent / "samples-grid.png").read_bytes())
    assert grid_png.shape == (19 * 27, 19 * 27, 3)
    assert (grid_png[:27, :27] == 128).all()  # the border, one enlarged pixel
    again = cli("sample", "-T", trajectory, "--seeds", "0-3", "--grid", "--out", out.parent / "s2")
    assert f"the grid is {out.parent / 's2-grid.png'}" in again.stdout.replace("\n", "")

    result = cli(
        "sample",
        "-T",
        trajectory,
        "-n",
        "3",
        "--format",
        "npz",
        "--class",
        "7",
        "--out",
        tmp_path / "s.npz",
    )
    assert result.code == 0, result.stderr
    with np.load(tmp_path / "s.npz") as data:
        assert data["images"].shape == (3, 8, 8, 3) and data["images"].dtype == np.uint8
        assert data["labels"].tolist() == [7, 7, 7]


def test_dropout_is_kept_by_default_and_switchable(image_trajectory, tmp_path, monkeypatch):
    trajectory = tmp_path / "t"
    shutil.copytree(image_trajectory, trajectory)
    seen = []

    def spy(module, p):
        set_dropout(module, p)
        seen.append({b.dropout for b in module.modules() if isinstance(b, UNetBlock)})

    monkeypatch.setattr("disback_cli.stages.backtrack.set_dropout", spy)
    run_backtrack(BacktrackConfig(**BACKTRACK), trajectory, "keep")
    run_backtrack(BacktrackConfig(**BACKTRACK, dropout=0.0), trajectory, "off")
    assert seen == [{0.1}, {0.1}, {0.0}, {0.0}]  # generator and fake score of each run


def test_resume_with_active_dropout_is_exact(image_trajectory, tmp_path):
    trajectory = tmp_path / "t"
    shutil.copytree(image_trajectory, trajectory)

    class Crash(SilentReporter):
        def advance(self, completed, **fields):
            if completed == 4:
                raise RuntimeError("crash")

    run_backtrack(BacktrackConfig(**BACKTRACK), trajectory, "whole")
    with pytest.raises(RuntimeError):
        run_backtrack(BacktrackConfig(**BACKTRACK), trajectory, "resumed", reporter=Crash())
    run_backtrack(BacktrackConfig(**BACKTRACK), trajectory, "resumed")
    whole, resumed = backtrack_dir(trajectory, "whole"), backtrack_dir(trajectory, "resumed")
    assert file_digests(whole) == file_digests(resumed)
