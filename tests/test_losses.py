"""Each generator loss's gradient on x against a hand-computed case with linear denoisers."""

import pytest
import torch
from torch import nn

from disback_cli.config import BacktrackConfig
from disback_cli.method.dsm import clip_gradients, edm_denoising_loss, edm_loss_weight
from disback_cli.method.losses import GENERATOR_LOSSES, LOSS_TRAINING_SIGMA, make_generator_loss
from disback_cli.method.noise import TrainingSigma, karras_sigma
from disback_cli.method.schedule import AdaptiveSchedule, FixedSchedule
from disback_cli.models.conditioning import NO_CONDITIONS


class Linear(nn.Module):
    """D(x, sigma) = a x, with a trainable `a` (its gradient must not be touched by SiD)."""

    sigma_data = 0.5

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x, sigma, class_labels=None):
        return self.a * x


def case(seed=0):
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=rng).requires_grad_(True)
    noise = torch.randn(4, 3, generator=rng)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])
    return x, noise, sigma


def grad_of(loss_fn, x, sigma, noise, fake, target):
    out = loss_fn(x, sigma, noise, fake, target, NO_CONDITIONS)
    (grad,) = torch.autograd.grad(out.loss, x)
    return grad, out


def test_vsd_gradient_is_fake_minus_target_at_x_t():
    x, noise, sigma = case()
    a_f, a_t = 0.7, 0.4
    grad, out = grad_of(
        GENERATOR_LOSSES["vsd"](-1.2, 1.2), x, sigma, noise, Linear(a_f), Linear(a_t)
    )
    x_t = x.detach() + sigma[:, None] * noise
    torch.testing.assert_close(grad, (a_f - a_t) * x_t / 4)
    torch.testing.assert_close(out.score_gap, ((a_f - a_t) * x_t).abs().mean())


def test_dmd_gradient_is_normalised_per_sample():
    x, noise, sigma = case(1)
    a_f, a_t = 0.9, 0.2
    grad, _ = grad_of(GENERATOR_LOSSES["dmd"](), x, sigma, noise, Linear(a_f), Linear(a_t))
    x0 = x.detach()
    x_t = x0 + sigma[:, None] * noise
    scale = (x0 - a_t * x_t).abs().mean(dim=1, keepdim=True)
    # a mean over all 4 x 3 elements, as DMD2's mse_loss(reduction="mean")
    torch.testing.assert_close(grad, (a_f - a_t) * x_t / scale / 12)


def test_dmd_loss_value_is_dmd2s_on_fixed_image_tensors():
    """DMD2 (main/edm/edm_guidance.py): p_real = x - D_real, p_fake = x - D_fake,
    grad = (p_real - p_fake) / mean|p_real| per sample, loss = 0.5 * mse_loss(x, sg(x - grad))."""
    rng = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 4, 4, generator=rng).requires_grad_(True)
    noise = torch.randn(3, 2, 4, 4, generator=rng)
    sigma = torch.tensor([0.3, 2.0, 15.0])
    fake, real = Linear(0.6), Linear(0.25)
    out = GENERATOR_LOSSES["dmd"]()(x, sigma, noise, fake, real, NO_CONDITIONS)
    x0 = x.detach()
    x_t = x0 + sigma.reshape(-1, 1, 1, 1) * noise
    p_real, p_fake = x0 - 0.25 * x_t, x0 - 0.6 * x_t
    grad = (p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
    expected = 0.5 * torch.nn.functional.mse_loss(x0, x0 - grad, reduction="mean")
    torch.testing.assert_close(out.loss, expected)
    # ... and its gradient is DMD2's `grad` over the number of elements
    (g,) = torch.autograd.grad(out.loss, x)
    torch.testing.assert_close(g, grad / x.numel())


def test_sid_gradient_goes_through_x_t_and_spares_the_fake_weights():
    """loss.backward() (as the training loop calls it, unlike autograd.grad, fills `.grad`): the
    generator's parameter and its sample x get SiD's gradient, the fake score's weight none."""
    x, noise, sigma = case(2)
    a_f, a_r, alpha = 0.3, 0.8, 1.2
    generator_scale = nn.Parameter(torch.tensor(1.0))  # a one-parameter generator: x = s * z
    z = x.detach()
    sample = generator_scale * z
    sample.retain_grad()
    fake, target = Linear(a_f), Linear(a_r)
    out = GENERATOR_LOSSES["sid"](alpha)(sample, sigma, noise, fake, target, NO_CONDITIONS)
    out.loss.backward()
    assert fake.a.grad is None and fake.a.requires_grad  # frozen for the loss, then restored
    x_t = z + sigma[:, None] * noise
    c = a_r - a_f
    scale = (z - a_r * x_t).abs().mean(dim=1, keepdim=True)
    # d/dx of sum c x_t (a_r x_t - x - alpha c x_t), with d x_t / d x = 1:
    expected = (c * (a_r * x_t - z - alpha * c * x_t) + c * x_t * (a_r - 1 - alpha * c)) / scale / 4
    torch.testing.assert_close(sample.grad, expected)
    torch.testing.assert_close(generator_scale.grad, (expected * z).sum())
    assert generator_scale.grad.abs() > 0


def test_edm_loss_weight_is_one_over_sigma_squared_plus_one_over_sigma_data_squared():
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 at hand-computed points (sd = 0.5)."""
    sigma = torch.tensor([0.5, 1.0, 2.0, 0.1])
    # 1/sigma^2 + 1/sd^2 = 4 + 4, 1 + 4, 0.25 + 4, 100 + 4
    torch.testing.assert_close(edm_loss_weight(sigma, 0.5), torch.tensor([8.0, 5.0, 4.25, 104.0]))
    torch.testing.assert_close(edm_loss_weight(torch.tensor([2.0]), 1.0), torch.tensor([1.25]))


class Shrink(nn.Module):
    """D(x, sigma) = x / 2 with sigma_data 0.5; remembers the noised input it was given."""

    sigma_data = 0.5

    def forward(self, x, sigma, class_labels=None):
        self.seen = (x.clone(), sigma.clone())
        return x / 2


def test_edm_denoising_loss_is_the_weighted_squared_error_at_several_sigmas():
    """The loss of D(x) = x / 2 at x0 + sigma n, written out per element with plain floats."""
    x0 = [[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]]
    noise = [[0.3, -1.0], [2.0, 0.5], [-0.7, 1.5]]
    sigma = [0.2, 1.7, 6.0]  # none is 1, so an unscaled noise would show
    denoiser = Shrink()
    loss = edm_denoising_loss(denoiser, torch.tensor(x0), torch.tensor(sigma), torch.tensor(noise))
    total = 0.0
    for row, n_row, s in zip(x0, noise, sigma, strict=True):
        weight = (s * s + 0.25) / (s * 0.5) ** 2
        for a, n in zip(row, n_row, strict=True):
            total += weight * ((a + s * n) / 2 - a) ** 2
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)
    seen_x, _ = denoiser.seen
    torch.testing.assert_close(
        seen_x, torch.tensor(x0) + torch.tensor(sigma)[:, None] * torch.tensor(noise)
    )


def test_losses_sample_their_own_noise_levels():
    rng = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    dmd = GENERATOR_LOSSES["dmd"]().sample_sigma(5000, rng, cpu)
    sid = GENERATOR_LOSSES["sid"]().sample_sigma(5000, rng, cpu)
    assert dmd.min() >= karras_sigma(torch.tensor(20 / 999)) and dmd.max() <= 80
    assert sid.min() >= 0.002 and sid.max() <= karras_sigma(torch.tensor(0.8)) < 25


def test_training_noise_levels_follow_each_losss_reference():
    rng = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    karras = TrainingSigma("karras").sample(20000, rng, cpu)
    lognormal = TrainingSigma("lognormal", -1.2, 1.2).sample(20000, rng, cpu)
    # DMD2 trains its fake score at a uniform index of 1000 Karras levels: sigma > 10 about a
    # third of the time; EDM's log-normal almost never goes there
    assert 0.30 < (karras > 10).float().mean() < 0.34
    assert (lognormal > 10).float().mean() < 0.005
    assert karras.min() >= 0.002 * (1 - 1e-5) and karras.max() <= 80 * (1 + 1e-5)
    assert LOSS_TRAINING_SIGMA == {
        "vsd": "lognormal",
        "dmd": "karras",
        "sid": "lognormal",
        "diffratio": "lognormal",
    }


@pytest.mark.parametrize("name", ["vsd", "dmd", "sid", "diffratio"])
def test_losses_are_built_from_the_config(name):
    resolved = dict(p_mean=-1.0, p_std=1.0, sid_alpha=1.0, ratio_weighting="score")
    loss = make_generator_loss(BacktrackConfig(loss=name, **resolved))
    assert isinstance(loss, GENERATOR_LOSSES[name])


def test_fixed_schedule_follows_target_node():
    schedule = FixedSchedule(last_node=4, interval=10)
    assert [schedule.target(i) for i in (0, 9, 10, 29, 30, 99)] == [3, 3, 2, 1, 0, 0]


def test_adaptive_schedule_advances_when_the_gap_stops_falling():
    schedule = AdaptiveSchedule(last_node=3, patience=5, tolerance=0.01, smoothing=0.0)
    targets = []
    for gap in [1.0, 0.8, 0.6, 0.5] + [0.5] * 5 + [2.0, 1.0, 0.5, 0.4] + [0.4] * 5 + [1.0] * 10:
        targets.append(schedule.target(len(targets)))
        schedule.observe(gap)
    # node 2 while the gap falls, 5 flat steps -> node 1, again -> node 0 (the teacher) for good
    assert targets[:9] == [2] * 9 and targets[9:18] == [1] * 9 and set(targets[18:]) == {0}


def test_adaptive_schedule_respects_the_maximum_interval_and_round_trips():
    schedule = AdaptiveSchedule(last_node=2, patience=100, max_interval=7)
    for i in range(7):
        assert schedule.target(i) == 1
        schedule.observe(1.0 / (i + 1))  # still falling, but the cap is reached
    assert schedule.target(7) == 0
    copy = AdaptiveSchedule(last_node=2, patience=100, max_interval=7)
    copy.load_state_dict(schedule.state_dict())
    assert copy.state_dict() == schedule.state_dict()


def test_gradients_are_clipped_to_the_total_norm_and_the_norm_before_is_returned():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # total norm 5
    assert clip_gradients([a, b], clip=1.0).item() == pytest.approx(5.0)
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.8]), atol=1e-6)
    assert clip_gradients([a, b]).item() == pytest.approx(1.0)  # no clip: left as they are
    assert torch.allclose(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.8]), atol=1e-6)
