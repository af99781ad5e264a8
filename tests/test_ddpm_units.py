"""The `ddpm` preconditioning's parts one by one (`models/discrete_ddpm.py`): the timestep of a
noise level against an independent interpolation, the trained range at both ends, its defaults
and refusals, and the discrete noise levels the losses draw. Its formulas against diffusers are
pinned in test_pins.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.discrete_ddpm import DiscreteDDPMPrecond, DiscreteSigma, ddpm_sigmas


class Echo(nn.Module):
    """A raw network that returns its input (the preconditioning is what is tested)."""

    def forward(self, x, t, class_labels=None, **cond):
        return x


def precond(**kwargs) -> DiscreteDDPMPrecond:
    return DiscreteDDPMPrecond(Echo(), (4, 8, 8), **kwargs)


def interpolated(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> np.ndarray:
    """The fractional timestep by numpy: linear in log sigma, held at the ends."""
    table = log_sigmas.double().numpy()
    return np.interp(sigma.double().log().numpy(), table, np.arange(len(table)))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_timestep_of_a_noise_level_is_interpolated_in_log_sigma(prediction):
    denoiser = precond(prediction_type=prediction)
    table = denoiser.sigmas
    inside = torch.exp(torch.empty(500).uniform_(table[0].log().item(), table[-1].log().item()))
    sigma = torch.cat([inside, table[[0, 1, 500, 998, 999]], torch.tensor([1e-4, 1e4])])
    t = denoiser.timestep(sigma)
    np.testing.assert_allclose(t.numpy(), interpolated(sigma, denoiser.log_sigmas), atol=2e-3)
    assert t[-7:].tolist() == pytest.approx([0, 1, 500, 998, 999, 0, 999], abs=2e-3)
    assert t.dtype == torch.float32 and t.shape == sigma.shape


def test_the_timestep_keeps_the_shape_of_its_noise_levels():
    denoiser = precond()
    sigma = denoiser.sigmas[[10, 20, 30, 40, 50, 60]].reshape(2, 3, 1)
    t = denoiser.timestep(sigma)
    assert t.shape == (2, 3, 1)
    torch.testing.assert_close(t.squeeze(-1), torch.tensor([[10.0, 20, 30], [40, 50, 60]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_the_timestep_is_found_in_float32_whatever_the_noise_levels_dtype(dtype):
    """A bf16 sigma's own log would move the timestep by several steps."""
    denoiser = precond()
    sigma = torch.tensor([0.05, 0.9, 3.0, 11.0]).to(dtype)
    t = denoiser.timestep(sigma)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, denoiser.timestep(sigma.float()))


def test_the_defaults_are_stable_diffusions_schedule_and_the_table_is_not_saved():
    denoiser = precond()
    expected = ddpm_sigmas(0.00085, 0.012, "scaled_linear", 1000)
    torch.testing.assert_close(denoiser.sigmas, expected.float())
    assert denoiser.prediction_type == "epsilon" and denoiser.label_dim == 0
    assert denoiser.use_fp16 is False
    assert denoiser.sigmas.dtype == denoiser.log_sigmas.dtype == torch.float32
    assert (denoiser.sigma_min, denoiser.sigma_max) == (float(expected[0]), float(expected[-1]))
    assert not {"sigmas", "log_sigmas"} & set(denoiser.state_dict())  # derived, not weights


def test_the_schedule_is_built_on_the_cpu_even_under_a_meta_device():
    """Networks are counted on the meta device first: the noise table must stay real."""
    with torch.device("meta"):
        denoiser = precond(label_dim=3)
    assert denoiser.sigmas.device.type == "cpu" and denoiser.label_dim == 3
    assert denoiser.sigma_max == precond().sigma_max


def test_the_labels_and_the_fp16_flag_reach_the_wrapper():
    denoiser = precond(label_dim=5, use_fp16=True)
    assert (denoiser.label_dim, denoiser.use_fp16) == (5, True)


def test_a_bad_schedule_is_refused_with_its_bounds():
    with pytest.raises(DisbackError) as caught:
        precond(beta_end=2.0)
    assert str(caught.value) == (
        "beta schedule must have 0 < beta_start < beta_end < 1 and 2..1e5 steps"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prediction_type": "sample"}, "prediction type 'sample' is not supported (known: "),
        ({"prediction_type": "sample"}, "(known: epsilon, v_prediction)"),
        ({"beta_schedule": "sigmoid"}, "(known: linear, scaled_linear, squaredcos_cap_v2)"),
        ({"beta_start": 0.0}, "beta schedule must have 0 < beta_start < beta_end < 1 and 2..1e5"),
        ({"beta_start": 0.012}, "beta schedule must have 0 < beta_start"),
        ({"beta_end": 1.0}, "beta schedule must have 0 < beta_start"),
        ({"num_train_timesteps": 1}, "beta schedule must have 0 < beta_start"),
        ({"num_train_timesteps": 100_001}, "beta schedule must have 0 < beta_start"),
    ],
)
def test_a_schedule_outside_what_is_supported_is_refused(kwargs, message):
    with pytest.raises(DisbackError) as caught:
        precond(**kwargs)
    assert message in str(caught.value)


@pytest.mark.parametrize("steps", [2, 100_000])
def test_the_bounds_of_the_step_count_are_included(steps):
    assert len(precond(num_train_timesteps=steps, beta_schedule="linear").sigmas) == steps


def test_the_fake_scores_levels_are_every_trained_timestep_drawn_from_the_stream():
    table = ddpm_sigmas(0.00085, 0.012, "scaled_linear", 1000)
    levels = DiscreteSigma(table)
    drawn = levels.sample(100_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    index = torch.randint(0, 1000, (100_000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, table[index])
    assert drawn.min() == table[0] and drawn.max() == table[-1]


@pytest.mark.parametrize(("steps", "low", "high"), [(1000, 20, 980), (50, 1, 49)])
def test_the_generators_levels_are_dmd2s_two_to_ninety_eight_percent(steps, low, high):
    table = ddpm_sigmas(0.0001, 0.02, "linear", steps)
    levels = DiscreteSigma.generator_levels(table)
    drawn = levels.sample(50_000, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert drawn.min() == table[low] and drawn.max() == table[high]  # both ends included
    index = torch.randint(low, high + 1, (50_000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, table[index])
