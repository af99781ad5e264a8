"""DiffRatio's classifier step pinned unit by unit (written against mutmut's survivors of
`method/ratio`): its draws in order from the run's stream, labels 1 for noised data and 0 for
noised generator samples, each with its own noise level and its own conditions, the logistic
loss, and the score difference read from the ratio's input gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disback_cli.method.ratio import ratio_step, score_difference
from disback_cli.models.conditioning import Conditioning


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Labels:
    def draw(self, n, rng, device):
        return Conditioning({"class_labels": torch.rand(n, 2, generator=rng, device=device)})


class Data:
    """Real samples and their labels, drawn from the given stream."""

    def draw(self, n, rng, device):
        x = torch.randn(n, 3, generator=rng, device=device) + 1.0
        return x, Conditioning({"class_labels": torch.full((n, 2), 0.5)})


class Levels:
    def sample(self, n, rng, device):
        return torch.rand(n, generator=rng, device=device) + 0.1


class Generator(nn.Module):
    def forward(self, z, **cond):
        return 2 * z - cond["class_labels"][:, :1]


class Ratio(nn.Module):
    """d(x, sigma, labels) = w . x + sigma + labels . 1: records the labels it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))
        self.labels = []

    def forward(self, x, sigma, class_labels=None):
        self.labels.append(class_labels.clone())
        sigma = torch.as_tensor(sigma).reshape(-1)
        return x @ self.w + sigma + class_labels.sum(dim=1)


def test_a_ratio_step_is_the_logistic_loss_on_noised_data_against_noised_samples():
    def step(seed: int):
        ratio = Ratio()
        optimizer = torch.optim.SGD(ratio.parameters(), lr=0.0)
        torch.manual_seed(seed + 50)  # the global stream must not matter
        rng = seeded(seed)
        loss, norm = ratio_step(
            ratio, optimizer, Generator(), (4, 3), Labels(), Levels(), rng, data=Data()
        )
        return loss, norm, ratio, rng

    loss, norm, ratio, rng = step(9)
    replay = seeded(9)
    z = torch.randn(4, 3, generator=replay)
    labels = torch.rand(4, 2, generator=replay)
    real = torch.randn(4, 3, generator=replay) + 1.0
    sigma_real = torch.rand(4, generator=replay) + 0.1
    noise_real = torch.randn(4, 3, generator=replay)
    sigma_fake = torch.rand(4, generator=replay) + 0.1
    noise_fake = torch.randn(4, 3, generator=replay)
    assert torch.equal(rng.get_state(), replay.get_state())  # those draws and no others
    fake = 2 * z - labels[:, :1]
    w = torch.tensor([0.3, -0.2, 0.1])
    real_logit = (real + sigma_real[:, None] * noise_real) @ w + sigma_real + 1.0
    fake_logit = (fake + sigma_fake[:, None] * noise_fake) @ w + sigma_fake + labels.sum(dim=1)
    expected = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
    torch.testing.assert_close(loss, expected)
    assert torch.equal(ratio.labels[0], torch.full((4, 2), 0.5))  # the data's own labels
    assert torch.equal(ratio.labels[1], labels)  # the generator's
    again, again_norm, _, _ = step(9)
    assert torch.equal(loss, again) and torch.equal(norm, again_norm) and norm > 0


def test_the_score_difference_is_minus_sigma_squared_times_the_ratio_gradient():
    ratio = Ratio()
    x_t = torch.randn(5, 3, generator=seeded(1))
    sigma = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    gap = score_difference(ratio, x_t, sigma, {"class_labels": torch.zeros(5, 2)})
    expected = -(sigma[:, None] ** 2) * torch.tensor([0.3, -0.2, 0.1])
    torch.testing.assert_close(gap, expected)
    assert ratio.w.grad is None  # the ratio's weights get no gradient from the generator's update
