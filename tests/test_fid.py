"""The image evaluation path through clean-fid's resizer and Inception wrapper, with a small
TorchScript stand-in for inception-2015-12-05.pt (the real weights cannot be fetched here)."""

import json
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from disback_cli.evaluation.detectors import INCEPTION_SHA256, InceptionDetector
from disback_cli.evaluation.image_eval import extract_features
from disback_cli.evaluation.image_io import folder_images, npz_images
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.store.fileio import sha256_file
from disback_cli.store.images import encode_png, png_name


class StandInLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(F.adaptive_avg_pool2d(x, 8).flatten(1)))


class StandInInception(nn.Module):
    """Same interface as the TorchScript Inception: base(x, return_features=True) resizes to 299
    inside; `layers` takes normalised 299x299 input."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = StandInLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("detector") / "stand-in.pt"
    torch.jit.script(StandInInception()).save(str(path))
    return str(path)


@pytest.fixture
def trusted(stand_in, monkeypatch):
    """Let the CLI accept the stand-in's hash (the real file's hash is checked otherwise)."""
    monkeypatch.setattr("disback_cli.evaluation.detectors.INCEPTION_SHA256", sha256_file(stand_in))
    return stand_in


def images_like(n: int, seed: int, size: int = 8, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size, size, channels))
    return np.clip(base + rng.integers(-40, 40, (n, size, size, channels)), 0, 255).astype(np.uint8)


def write_folder(root, images):
    for i, image in enumerate(images):
        path = root / png_name(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(image))
    return root


def write_npz(path, images):
    np.savez(path, images=images)
    return path


@pytest.mark.parametrize("mode", ["legacy_tensorflow", "clean"])
def test_folder_and_npz_of_the_same_images_give_the_same_features(stand_in, tmp_path, mode):
    images = images_like(10, 0)
    detector = InceptionDetector(stand_in, mode, expected_sha256=None)
    from_folder = extract_features(
        folder_images(write_folder(tmp_path / "f", images)), detector, 4, SilentReporter()
    )
    from_npz = extract_features(
        npz_images(write_npz(tmp_path / "i.npz", images)), detector, 3, SilentReporter()
    )
    assert from_folder.shape == (10, 2048)
    np.testing.assert_allclose(from_folder, from_npz, rtol=0, atol=1e-6)  # batch sizes differ


def test_modes_differ_and_greyscale_is_repeated_to_rgb(stand_in):
    grey = images_like(4, 1, channels=1)
    legacy = InceptionDetector(stand_in, "legacy_tensorflow", expected_sha256=None)
    clean = InceptionDetector(stand_in, "clean", expected_sha256=None)
    np.testing.assert_array_equal(legacy.features(grey), legacy.features(np.repeat(grey, 3, -1)))
    assert not np.allclose(legacy.features(grey), clean.features(grey))


def test_reference_round_trip_and_evaluation_report(trusted, tmp_path, cli):
    real = write_folder(tmp_path / "real", images_like(24, 2))
    result = cli(
        "evaluate", "ref", real, "--out", tmp_path / "ref.npz", "--inception", trusted, "--json"
    )
    assert result.code == 0, result.stderr
    written = json.loads(result.stdout)
    assert written["n"] == 24 and written["image_shape"] == [8, 8, 3]
    assert written["detector"]["mode"] == "legacy_tensorflow"
    with np.load(tmp_path / "ref.npz") as data:
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert data["features"].shape == (24, 2048)
        assert json.loads(str(data["meta"]))["detector"]["sha256"] == sha256_file(trusted)

    result = cli(
        "evaluate",
        real,
        "--ref",
        tmp_path / "ref.npz",
        "--inception",
        trusted,
        "--json",
        "--any-images",
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric"] == "FID" and report["repeats"] == 1
    only = report["results"][0]
    assert abs(only["fid"]) < 1e-4 and only["precision"] == 1.0 and only["recall"] == 1.0
    assert report["reference"]["sha256"] == sha256_file(tmp_path / "ref.npz")
    assert report["settings"]["pr_k"] == 3

    other = write_folder(tmp_path / "other", images_like(24, 3))
    result = cli(
        "evaluate",
        other,
        "--ref",
        tmp_path / "ref.npz",
        "--inception",
        trusted,
        "--repeats",
        "2",
        "--json",
        "--any-images",
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    fids = [r["fid"] for r in report["results"]]
    assert len(fids) == 2 and min(fids) > 0.01
    assert report["summary"]["fid"]["min"] == min(fids)
    assert report["results"][1]["images"] == [12, 23]


def test_edm_style_reference_gives_fid_only(trusted, tmp_path, cli):
    images = images_like(12, 4)
    features = InceptionDetector(trusted, "legacy_tensorflow", expected_sha256=None).features(
        images
    )
    np.savez(tmp_path / "edm.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    npz = write_npz(tmp_path / "s.npz", images)
    result = cli("evaluate", npz, "--ref", tmp_path / "edm.npz", "--inception", trusted, "--json")
    assert result.code == 0, result.stderr
    only = json.loads(result.stdout)["results"][0]
    assert abs(only["fid"]) < 1e-4 and only["kid"] is None and only["precision"] is None


def test_wrong_image_size_and_mode_are_refused(trusted, tmp_path, cli):
    write_folder(tmp_path / "real", images_like(6, 5))
    cli("evaluate", "ref", tmp_path / "real", "--out", tmp_path / "ref.npz", "--inception", trusted)
    big = write_npz(tmp_path / "big.npz", images_like(6, 5, size=16))
    result = cli("evaluate", big, "--ref", tmp_path / "ref.npz", "--inception", trusted)
    assert result.code == 1 and "16x16 but" in result.stderr and "8x8" in result.stderr
    result = cli(
        "evaluate",
        tmp_path / "real",
        "--ref",
        tmp_path / "ref.npz",
        "--inception",
        trusted,
        "--mode",
        "clean",
        "--any-images",
    )
    assert result.code == 1 and "mode legacy_tensorflow" in result.stderr


def test_missing_inception_weights_say_where_to_put_them(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no clean-fid copy in /tmp
    write_npz(tmp_path / "s.npz", images_like(4, 0))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    result = cli("evaluate", tmp_path / "s.npz", "--ref", tmp_path / "ref.npz")
    assert result.code == 1 and result.stderr.count("\n") == 1
    assert "inception-2015-12-05.pt not found" in result.stderr
    assert "--inception PATH" in result.stderr and "DISBACK_INCEPTION" in result.stderr
    assert f"sha256 {INCEPTION_SHA256})" in result.stderr  # whole, to check a download against


def test_inception_file_with_the_wrong_hash_is_refused(stand_in, tmp_path, cli):
    write_npz(tmp_path / "s.npz", images_like(4, 0))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    result = cli(
        "evaluate", tmp_path / "s.npz", "--ref", tmp_path / "ref.npz", "--inception", stand_in
    )
    assert result.code == 1 and "is not that of inception-2015-12-05.pt" in result.stderr


def test_images_need_a_reference(tmp_path, cli):
    write_npz(tmp_path / "s.npz", images_like(4, 0))
    result = cli("evaluate", tmp_path / "s.npz")
    assert result.code == 2 and "need --ref" in result.stderr
    assert "--clip CLIP_FOLDER" in result.stderr and result.stderr.count("\n") == 1


def test_on_the_fly_evaluation_of_a_run_matches_its_png_samples(trusted, tmp_path, cli):
    from edm_fixtures import tiny_network, write_edm_snapshot

    net, init_kwargs = tiny_network("ddpmpp", "edm")
    pkl = write_edm_snapshot(tmp_path / "tiny.pkl", net, init_kwargs)
    traj = tmp_path / "t"
    for args in (
        ["record", "--teacher", pkl, "--out", traj, "--iters", "2", "--nodes", "1", "--batch", "2"],
        ["backtrack", "-T", traj, "--iters", "2", "--batch", "2", "--save-every", "0"],
        ["sample", "-T", traj, "--seeds", "6-11", "--out", tmp_path / "png"],
        [
            "evaluate",
            "ref",
            write_folder(tmp_path / "real", images_like(12, 6)),
            "--out",
            tmp_path / "ref.npz",
            "--inception",
            trusted,
        ],
    ):
        result = cli(*args, "--device", "cpu") if args[0] != "evaluate" else cli(*args)
        assert result.code == 0, (args, result.stderr)
    result = cli(
        "evaluate",
        "-T",
        traj,
        "-n",
        "6",
        "--repeats",
        "2",
        "--ref",
        tmp_path / "ref.npz",
        "--inception",
        trusted,
        "--json",
    )
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [r["seeds"] for r in report["results"]] == [[0, 5], [6, 11]]
    from_files = cli(
        "evaluate",
        tmp_path / "png",
        "--ref",
        tmp_path / "ref.npz",
        "--inception",
        trusted,
        "--json",
    )
    assert from_files.code == 0, from_files.stderr
    fid_files = json.loads(from_files.stdout)["results"][0]["fid"]
    assert fid_files == pytest.approx(report["results"][1]["fid"], rel=1e-5)
