import itertools
import json

import numpy as np
import pytest
import torch

from conftest import backtracked_copy
from disback_cli.config import SampleConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.method.sampling import edm_sampler, parse_seeds, seeded_noise
from disback_cli.stages.sample import write_samples
from disback_cli.store.manifests import generator_file_of_run
from disback_cli.store.samples import read_samples


@pytest.fixture(scope="module")
def trained(small_trajectory, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    return backtracked_copy(
        small_trajectory, folder, iters=20, interval=5, batch=64, save_every=10, device="cpu"
    )


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


class HalfDenoiser(torch.nn.Module):
    """D(x, sigma) = x / 2; remembers every (sigma, x) it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, torch.Tensor]] = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((float(sigma), x.clone()))
        return x / 2


def test_heun_sampler_uses_edms_18_step_schedule_and_35_evaluations():
    """Karras et al. 2022, Algorithm 1 and eq. 5: sigma_i = (80^(1/7) + i/17 (0.002^(1/7) -
    80^(1/7)))^7 for i = 0..17, then 0; one Euler evaluation per step and a correction at
    sigma_{i+1} for all but the last step, which goes to 0."""
    rho, n = 7, 18
    hi, lo = 80 ** (1 / rho), 0.002 ** (1 / rho)
    sigmas = [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]
    denoiser = HalfDenoiser()
    latents = torch.tensor([[1.0, -0.5], [2.0, 0.25]])
    out = edm_sampler(denoiser, latents)
    seen = [sigma for sigma, _ in denoiser.calls]
    assert len(seen) == 35
    assert seen[0] == pytest.approx(80.0, rel=1e-12) and seen[-1] == pytest.approx(0.002, rel=1e-12)
    expected = [sigmas[0]] + [s for s in sigmas[1:] for _ in range(2)]
    assert seen == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(denoiser.calls[0][1], latents.double() * 80)
    # With D = x/2, dx/dsigma = x / (2 sigma): each Heun step multiplies x by a known factor,
    # and the last (Euler to sigma = 0) halves it.
    factor = 1.0
    for t, t_next in itertools.pairwise(sigmas):
        h = t_next - t
        factor *= 1 + h / 2 * (1 / (2 * t) + (1 + h / (2 * t)) / (2 * t_next))
    torch.testing.assert_close(out, latents.double() * 80 * factor / 2, rtol=1e-10, atol=0)


def test_grid_of_two_dimensional_samples_is_a_scatter_plot(trained, tmp_path):
    from conftest import run_cli

    out = tmp_path / "ring.npz"
    result = run_cli("sample", "-T", trained, "-n", "500", "--out", out, "--grid", "--json")
    assert result.code == 0, result.stderr
    picture = tmp_path / "ring-grid.png"
    assert json.loads(result.stdout)["grid"] == str(picture)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_samples(out)[0].shape == (500, 2)  # the samples themselves are unchanged
