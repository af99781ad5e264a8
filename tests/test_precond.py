import math

import pytest
import torch
from torch import nn

from disback_cli.models.networks import NetworkSpec, build_denoiser
from disback_cli.models.precond import EDMPrecond, VEPrecond, VPPrecond


class Recorder(nn.Module):
    """Raw network that returns a constant and remembers its inputs."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x.clone(), noise_labels.clone(), class_labels)
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("sigma", [0.002, 0.5, 1.4, 80.0])
def test_edm_coefficients_match_karras_table_1(sigma):
    sd = 0.7
    net = Recorder(value=3.0)
    denoiser = EDMPrecond(net, data_shape=(4,), sigma_data=sd)
    x = torch.randn(5, 4)
    out = denoiser(x, sigma)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
    c_in = 1 / math.sqrt(sigma**2 + sd**2)
    torch.testing.assert_close(out, c_skip * x + c_out * 3.0)
    seen_x, seen_noise, _ = net.seen
    torch.testing.assert_close(seen_x, c_in * x)
    torch.testing.assert_close(seen_noise, torch.full((5,), math.log(sigma) / 4))


def test_per_sample_sigma_and_conditional_default_labels():
    net = Recorder(value=0.0)
    denoiser = EDMPrecond(net, data_shape=(2,), label_dim=3, sigma_data=1.0)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    x = torch.ones(3, 2)
    out = denoiser(x, sigma)
    torch.testing.assert_close(out[:, 0], 1 / (sigma**2 + 1))
    assert torch.equal(net.seen[2], torch.zeros(3, 3))  # missing labels become zeros


def test_mlp_spec_builds_denoiser_with_edm_parameter_names():
    spec = NetworkSpec(
        arch="mlp",
        arch_kwargs={"hidden": 16, "depth": 2},
        precond_kwargs={"sigma_data": 1.4},
        data_shape=(2,),
    )
    denoiser = build_denoiser(spec)
    assert all(k.startswith("model.") for k in denoiser.state_dict())
    assert denoiser(torch.randn(7, 2), 0.3).shape == (7, 2)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        NetworkSpec(arch="resnet9000", data_shape=(2,))


# Karras et al. 2022, Table 1, written out here by hand; EDM's defaults for VP and VE.
BETA_D, BETA_MIN, M, EPSILON_T = 19.9, 0.1, 1000, 1e-5


def vp_sigma(t: float) -> float:
    return math.sqrt(math.exp(0.5 * BETA_D * t**2 + BETA_MIN * t) - 1)


def vp_sigma_inv(sigma: float) -> float:
    return (math.sqrt(BETA_MIN**2 + 2 * BETA_D * math.log(sigma**2 + 1)) - BETA_MIN) / BETA_D


@pytest.mark.parametrize("t", [0.05, 0.3, 0.5, 1.0])
def test_vp_coefficients_match_karras_table_1(t):
    """VP: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t."""
    net = Recorder(value=3.0)
    denoiser = VPPrecond(net, data_shape=(4,))
    sigma = vp_sigma(t)
    assert vp_sigma_inv(sigma) == pytest.approx(t, rel=1e-12)  # the hand formulas agree
    x = torch.randn(5, 4)
    out = denoiser(x, sigma)
    torch.testing.assert_close(out, x - sigma * 3.0)
    seen_x, seen_noise, _ = net.seen
    torch.testing.assert_close(seen_x, x / math.sqrt(sigma**2 + 1))
    # (M - 1) sigma^-1(sigma) = 999 t: 499.5 at t = 0.5, where M t would give 500
    torch.testing.assert_close(seen_noise, torch.full((5,), (M - 1) * t), rtol=2e-5, atol=1e-6)


def test_vp_noise_level_range_is_sigma_of_epsilon_t_and_one():
    denoiser = VPPrecond(Recorder(0.0), data_shape=(2,))
    # float32, as in EDM's own VPPrecond: exp(~1e-6) - 1 keeps about 2 % of sigma_min (0.000977
    # for 0.0010005); samplers clamp to 0.002 anyway
    assert denoiser.sigma_min == pytest.approx(vp_sigma(EPSILON_T), rel=0.03)
    assert denoiser.sigma_max == pytest.approx(vp_sigma(1.0), rel=1e-6)
    assert denoiser.sigma_max == pytest.approx(152.167, abs=1e-3)  # sqrt(exp(10.05) - 1)
    for t in (0.1, 0.7):
        assert float(denoiser.sigma(torch.tensor(t, dtype=torch.float64))) == pytest.approx(
            vp_sigma(t), rel=1e-12
        )
        sigma = torch.tensor(vp_sigma(t), dtype=torch.float64)
        assert float(denoiser.sigma_inv(sigma)) == pytest.approx(t, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.02, 0.7, 5.0, 100.0])
def test_ve_coefficients_match_karras_table_1(sigma):
    """VE: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""
    net = Recorder(value=-2.0)
    denoiser = VEPrecond(net, data_shape=(3,))
    x = torch.randn(6, 3)
    out = denoiser(x, sigma)
    torch.testing.assert_close(out, x + sigma * -2.0)
    seen_x, seen_noise, _ = net.seen
    torch.testing.assert_close(seen_x, x)
    torch.testing.assert_close(seen_noise, torch.full((6,), math.log(0.5 * sigma)))
