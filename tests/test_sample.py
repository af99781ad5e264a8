import json
import shutil

import numpy as np
import pytest
import torch

from disback_cli.backtrack import run_backtrack
from disback_cli.config import BacktrackConfig, SampleConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.generate import generator_file_of_run, read_samples, write_samples
from disback_cli.sampling import parse_seeds, seeded_noise


@pytest.fixture(scope="module")
def trained(small_trajectory, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "t"
    shutil.copytree(small_trajectory, out)
    run_backtrack(BacktrackConfig(iters=20, interval=5, batch=64, save_every=10, device="cpu"), out)
    return out


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("7, 1,10-11") == [7, 1, 10, 11]
    for bad in ("5-2", "a-b", "", "-3"):
        with pytest.raises(DisbackError):
            parse_seeds(bad)


def test_noise_depends_only_on_the_seed():
    a, _ = seeded_noise([3, 4, 5], (2,))
    b, _ = seeded_noise([5], (2,))
    assert torch.equal(a[2], b[0])


def test_samples_do_not_depend_on_batch_size(trained, tmp_path):
    path, sha = generator_file_of_run(trained, "default", "ema")
    outs = []
    for batch in (1, 7, 100):
        cfg = SampleConfig(n=40, batch=batch, device="cpu")
        write_samples(cfg, path, tmp_path / f"b{batch}.npz", sha)
        outs.append(read_samples(tmp_path / f"b{batch}.npz")[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=1e-6)


def test_npz_contents_and_provenance(trained, tmp_path):
    path, sha = generator_file_of_run(trained, "default", "raw")
    summary = write_samples(
        SampleConfig(seeds="10-14", device="cpu"), path, tmp_path / "s.npz", sha
    )
    with np.load(tmp_path / "s.npz") as data:
        assert data["samples"].shape == (5, 2) and data["samples"].dtype == np.float32
        assert data["seeds"].tolist() == [10, 11, 12, 13, 14]
        meta = json.loads(str(data["meta"]))
    assert meta["dataset"] == "ring2d" and meta["weights"] == "raw" and meta["step"] == 20
    assert summary["generator_sha256"] == sha


def test_n_and_seeds_together_are_refused(trained, tmp_path):
    path, sha = generator_file_of_run(trained, "default", "ema")
    with pytest.raises(ConfigError, match="either -n or --seeds"):
        write_samples(SampleConfig(n=3, seeds="0-2"), path, tmp_path / "s.npz", sha)
    assert not (tmp_path / "s.npz").exists()


def test_run_without_generator_is_an_error(small_trajectory):
    with pytest.raises(DisbackError, match="no backtrack run named"):
        generator_file_of_run(small_trajectory, "nope", "ema")
