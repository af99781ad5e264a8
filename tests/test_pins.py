"""The newest formulas pinned against an independent computation (issue #27): the discrete-time
noise schedules against diffusers, the DSM weights against the UNet's own epsilon / v losses,
DiffRatio's update at the noised point on Gaussians whose variances differ (where the point
matters), the pixel scale of real data from folders and zips, and the exit code of a stop."""

from __future__ import annotations

import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from disback_cli.errors import InterruptedRun
from disback_cli.method.data import open_data
from disback_cli.method.losses import DiffRatioLoss
from disback_cli.models.conditioning import NO_CONDITIONS
from disback_cli.models.discrete_ddpm import DiscreteDDPMPrecond, ddpm_sigmas
from disback_cli.store.images import encode_png, png_name

SCHEDULES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]


@pytest.mark.parametrize(("schedule", "start", "end"), SCHEDULES)
def test_every_beta_schedule_equals_diffusers(schedule, start, end):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(
        beta_start=start, beta_end=end, beta_schedule=schedule, num_train_timesteps=1000
    )
    alpha_bar = scheduler.alphas_cumprod.double()
    expected = ((1 - alpha_bar) / alpha_bar).sqrt()
    # diffusers computes its betas in float32, ours are float64: they agree to 1e-3 at the
    # smallest sigma (where float32's 1 - alpha_bar loses digits) and far better elsewhere; a
    # wrong schedule (no cosine offset, unsquared scaled_linear) is off by orders of magnitude
    torch.testing.assert_close(ddpm_sigmas(start, end, schedule, 1000), expected, rtol=1e-3, atol=0)


class Fixed(nn.Module):
    """A raw network that answers `out`, whatever it is asked."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x, t, class_labels=None, **cond):
        return self.out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_dsm_weight_turns_the_denoiser_error_into_the_unets_own_loss(prediction):
    """weight(sigma) |D - x0|^2 equals the UNet's training loss on the same output: |eps_hat -
    n|^2 for epsilon prediction, |v_hat - v|^2 with v = sqrt(ab) n - sqrt(1 - ab) x0 for v."""
    gen = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(6, 4, 2, 2, generator=gen) for _ in range(3))
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    precond = DiscreteDDPMPrecond(Fixed(out), (4, 2, 2), prediction_type=prediction, **schedule)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    sigma = precond.sigmas[t].float()
    s = sigma.reshape(-1, 1, 1, 1)
    denoised = precond(x0 + s * noise, sigma)
    weighted = precond.loss_weight(s) * (denoised - x0) ** 2
    alpha_bar = 1 / (1 + s**2)  # sigma^2 = (1 - ab) / ab
    v = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    target = noise if prediction == "epsilon" else v
    torch.testing.assert_close(weighted, (out - target) ** 2, rtol=1e-4, atol=1e-5)


VAR_DATA, VAR_GEN = 0.3**2, 1.2**2  # zero-mean Gaussians of different variances


class ExactLogRatio(nn.Module):
    """log p_sigma(x) - log q_sigma(x) of N(0, VAR_DATA) against N(0, VAR_GEN), noised."""

    spec = SimpleNamespace(sigma_data=0.5)  # read by the score weighting only

    def forward(self, x, sigma, class_labels=None):
        s2 = torch.as_tensor(sigma).reshape(-1, 1) ** 2
        p, q = VAR_DATA + s2, VAR_GEN + s2
        return (-0.5 * x**2 / p - 0.5 * p.log() + 0.5 * x**2 / q + 0.5 * q.log()).sum(dim=1)


def test_diffratio_reads_the_score_difference_at_the_noised_point():
    """With unequal variances the log-ratio gradient depends on where it is read: the update is
    D_fake - D_target at x_t = x + sigma n, exactly, not at x."""
    gen = torch.Generator().manual_seed(4)
    x = (1.2 * torch.randn(256, 2, generator=gen)).requires_grad_(True)
    sigma = torch.exp(torch.randn(256, generator=gen))
    noise = torch.randn(256, 2, generator=gen)
    out = DiffRatioLoss(0.0, 1.0, "denoiser")(x, sigma, noise, ExactLogRatio(), None, NO_CONDITIONS)
    (grad,) = torch.autograd.grad(out.loss, x)
    s2 = sigma.reshape(-1, 1) ** 2
    x_t = x.detach() + sigma.reshape(-1, 1) * noise
    expected = (VAR_GEN / (VAR_GEN + s2) - VAR_DATA / (VAR_DATA + s2)) * x_t  # D_fake - D_target
    torch.testing.assert_close(grad * len(x), expected, rtol=1e-4, atol=1e-5)
    at_x = (VAR_GEN / (VAR_GEN + s2) - VAR_DATA / (VAR_DATA + s2)) * x.detach()
    assert (grad * len(x) - at_x).abs().max() > 0.1  # where it is read matters here


def known_images() -> np.ndarray:
    """Two 2x2 grey images whose pixels span the whole range: 0, 255 and the midpoints."""
    return np.array([[[0, 255], [128, 64]], [[255, 0], [1, 254]]], dtype=np.uint8)[..., None]


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_real_data_arrives_in_minus_one_to_one_with_its_labels(tmp_path, container):
    images = known_images()
    labels = {"labels": [[png_name(i), i] for i in range(len(images))]}
    if container == "folder":
        for i, image in enumerate(images):
            path = tmp_path / "d" / png_name(i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(image))
        (tmp_path / "d" / "dataset.json").write_text(json.dumps(labels))
        source = tmp_path / "d"
    else:
        source = tmp_path / "d.zip"
        with zipfile.ZipFile(source, "w") as archive:
            for i, image in enumerate(images):
                archive.writestr(png_name(i), encode_png(image))
            archive.writestr("dataset.json", json.dumps(labels))
    data = open_data(str(source), (1, 2, 2), label_dim=2)
    x, cond = data.draw(64, torch.Generator().manual_seed(0), torch.device("cpu"))
    classes = cond["class_labels"].argmax(dim=1)
    expected = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(x, expected[classes])  # label i is image i
    assert x.min() == -1 and x.max() == 1 and set(classes.tolist()) == {0, 1}


def test_a_stopped_run_exits_130_with_its_message(cli, monkeypatch):
    message = "SIGINT at iteration 7: state saved in t; run the same command again"

    def stopped(*args, **kwargs):
        raise InterruptedRun(message)

    monkeypatch.setattr("disback_cli.stages.record.run_record", stopped)
    done = cli("record", "--teacher", "builtin:ring2d", "--out", "t")
    assert done.code == 130
    assert done.stderr == f"error: {message}\n"
