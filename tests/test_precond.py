import math

import pytest
import torch
from torch import nn

from disback_cli.networks import NetworkSpec, build_denoiser
from disback_cli.precond import EDMPrecond


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
        arch="mlp", arch_kwargs={"hidden": 16, "depth": 2}, precond_kwargs={"sigma_data": 1.4},
        data_shape=(2,),
    )  # fmt: skip
    denoiser = build_denoiser(spec)
    assert all(k.startswith("model.") for k in denoiser.state_dict())
    assert denoiser(torch.randn(7, 2), 0.3).shape == (7, 2)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture"):
        NetworkSpec(arch="resnet9000", data_shape=(2,))
