"""The preconditioning wrapper's parts one by one (`models/precond.py`): what the raw network is
handed (scaled input, noise input, labels, extra conditions, dtypes), how sigma broadcasts, and
the EDM, VP and VE defaults, which are NVlabs/edm's. The coefficients against Karras et al.'s
Table 1 are in test_precond.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from disback_cli.models.precond import EDMPrecond, VEPrecond, VPPrecond, sigma_like


class Recorder(nn.Module):
    """A raw network that answers a fixed tensor and keeps what it was called with."""

    def __init__(self, answer: torch.Tensor) -> None:
        super().__init__()
        self.answer = answer
        self.calls: list[tuple] = []

    def forward(self, x, c_noise, class_labels=None, **cond):
        self.calls.append((x, c_noise, class_labels, cond))
        return self.answer


def test_sigma_broadcasts_against_the_batch_as_float32():
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    scalar = sigma_like(0.7, x)
    assert scalar.shape == (3, 1, 1, 1) and scalar.dtype == torch.float32
    assert scalar.flatten().tolist() == pytest.approx([0.7] * 3)
    per_sample = sigma_like(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), x)
    assert per_sample.shape == (3, 1, 1, 1) and per_sample.flatten().tolist() == [1, 2, 3]
    assert per_sample.dtype == torch.float32  # a float64 sigma too
    assert sigma_like(torch.tensor([[0.5]]), torch.zeros(2, 5)).shape == (2, 1)


@pytest.mark.parametrize("use_fp16", [False, True])
def test_the_raw_network_gets_the_scaled_input_and_noise_and_answers_through_c_out(use_fp16):
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 5.0, 80.0])
    answer = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    raw = Recorder(answer.double())  # whatever the raw network answers in: float32 out
    denoiser = EDMPrecond(raw, (3,), sigma_data=0.5, use_fp16=use_fp16)
    out = denoiser(x, sigma, extra=torch.ones(4, 7))
    seen_x, c_noise, labels, cond = raw.calls[0]
    s, sd = sigma[:, None], 0.5
    # on the CPU the raw network runs in float32 whatever use_fp16 says (bf16 is for CUDA)
    assert seen_x.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(seen_x, x.float() / (sd**2 + s**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    assert c_noise.shape == (4,) and labels is None and list(cond) == ["extra"]
    expected = sd**2 / (s**2 + sd**2) * x.float() + s * sd / (s**2 + sd**2).sqrt() * answer
    torch.testing.assert_close(out, expected)


def test_labels_are_float_rows_of_the_label_width_and_zeros_when_absent():
    raw = Recorder(torch.zeros(2, 3))
    denoiser = EDMPrecond(raw, (3,), label_dim=4)
    denoiser(torch.zeros(2, 3), 1.0)
    assert torch.equal(raw.calls[0][2], torch.zeros(2, 4))
    denoiser(torch.zeros(2, 3), 1.0, class_labels=torch.tensor([1, 0, 0, 0, 0, 0, 1, 0]))
    labels = raw.calls[1][2]
    assert labels.dtype == torch.float32 and labels.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0]]


def test_the_defaults_are_edms():
    """NVlabs/edm's EDMPrecond, VPPrecond and VEPrecond defaults: files that leave a value out
    mean these."""
    edm = EDMPrecond(nn.Identity(), (2,))
    assert (edm.sigma_data, edm.sigma_min, edm.sigma_max) == (0.5, 0.0, math.inf)
    assert (edm.label_dim, edm.use_fp16) == (0, False)
    vp = VPPrecond(nn.Identity(), (2,))
    assert (vp.beta_d, vp.beta_min, vp.M, vp.epsilon_t) == (19.9, 0.1, 1000, 1e-5)
    assert (vp.label_dim, vp.use_fp16) == (0, False)
    ve = VEPrecond(nn.Identity(), (2,))
    assert (ve.sigma_min, ve.sigma_max, ve.label_dim, ve.use_fp16) == (0.02, 100.0, 0, False)


def test_the_vp_range_follows_its_arguments_and_survives_a_meta_device():
    with torch.device("meta"):
        vp = VPPrecond(nn.Identity(), (2,), label_dim=3, beta_d=10.0, beta_min=0.5, M=500)
    t = torch.tensor([1e-5, 1.0], dtype=torch.float64)
    expected = ((0.5 * 10.0 * t**2 + 0.5 * t).exp() - 1).sqrt()
    assert vp.sigma_min == pytest.approx(float(expected[0]), rel=1e-3)  # float32, as in EDM
    assert vp.sigma_max == pytest.approx(float(expected[1]), rel=1e-6)
    assert (vp.label_dim, vp.M) == (3, 500)
    assert float(vp.sigma(0.5)) == pytest.approx(math.sqrt(math.exp(5 * 0.25 + 0.25) - 1))
    sigma = torch.tensor([0.01, 0.5, 3.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma(vp.sigma_inv(sigma)), sigma)


def test_ve_and_vp_hand_their_labels_and_fp16_flag_to_the_wrapper():
    for cls in (VEPrecond, VPPrecond, EDMPrecond):
        denoiser = cls(nn.Identity(), (3, 4, 4), label_dim=7, use_fp16=True)
        assert (denoiser.label_dim, denoiser.use_fp16, denoiser.data_shape) == (7, True, (3, 4, 4))


def test_the_wrapper_alone_is_unconditional_and_in_float32_by_default():
    from disback_cli.models.precond import Precond

    plain = Precond(nn.Identity(), (2,))
    assert (plain.label_dim, plain.use_fp16, plain.data_shape) == (0, False, (2,))
