"""The generator's EMA: one update step and the decay per step, against hand arithmetic.

`ema_beta` follows EDM (training_loop.py): the half-life is `halflife_kimg * 1000` images, with
ramp-up at most `rampup * images_seen`, and beta = 0.5 ** (batch / half-life).
"""

import math

import pytest
import torch
from torch import nn

from disback_cli.method.ema import ema_beta, update_ema


def pair(ema_values, net_values):
    ema, net = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        for module, (w, b) in ((ema, ema_values), (net, net_values)):
            module.weight.copy_(torch.tensor([w]))
            module.bias.copy_(torch.tensor([b]))
    return ema, net


def test_one_ema_step_keeps_beta_of_the_average_and_takes_one_minus_beta_of_the_network():
    ema, net = pair(([1.0, -2.0], 10.0), ([3.0, 2.0], 0.0))
    update_ema(ema, net, beta=0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2, 0.9 * -2 + 0.1 * 2 = -1.6, 0.9 * 10 + 0.1 * 0 = 9
    torch.testing.assert_close(ema.weight, torch.tensor([[1.2, -1.6]]))
    torch.testing.assert_close(ema.bias, torch.tensor([9.0]))
    torch.testing.assert_close(net.weight, torch.tensor([[3.0, 2.0]]))  # the network is untouched
    update_ema(ema, net, beta=0.25)  # 0.25 * 1.2 + 0.75 * 3 = 2.55
    torch.testing.assert_close(ema.weight[0, 0], torch.tensor(2.55))


def test_ema_with_beta_zero_copies_and_with_beta_one_keeps():
    ema, net = pair(([1.0, 1.0], 1.0), ([5.0, 6.0], 7.0))
    update_ema(ema, net, beta=1.0)
    torch.testing.assert_close(ema.weight, torch.tensor([[1.0, 1.0]]))
    update_ema(ema, net, beta=0.0)
    torch.testing.assert_close(ema.weight, torch.tensor([[5.0, 6.0]]))
    torch.testing.assert_close(ema.bias, torch.tensor([7.0]))


def test_ema_refuses_networks_of_different_shapes():
    with pytest.raises(ValueError, match="different parameter lists"):
        update_ema(nn.Linear(2, 1), nn.Sequential(nn.Linear(2, 1), nn.Linear(1, 1)), 0.5)


@pytest.mark.parametrize(
    ("batch", "images_seen", "halflife_kimg", "rampup", "expected"),
    [
        (500, 10**6, 0.5, None, 0.5),  # one batch is one half-life: 500 images
        (250, 10**6, 0.5, None, math.sqrt(0.5)),  # half a half-life
        (1000, 10**6, 1.0, None, 0.5),  # a kimg is 1000 images, not 1024
        (100, 10**6, 2.0, None, 0.5 ** (100 / 2000)),
        (100, 10**6, 0.5, 0.05, 0.5 ** (100 / 500)),  # ramp-up allows 50 000: the half-life rules
        (100, 2000, 0.5, 0.05, 0.5),  # ramp-up: at most 0.05 * 2000 = 100 images
        (100, 4000, 0.5, 0.05, math.sqrt(0.5)),  # ... 200 images
        (64, 0, 0.5, 0.05, 0.0),  # nothing seen yet: the average is the network
    ],
)
def test_ema_beta_is_edms_half_life_with_ramp_up(
    batch, images_seen, halflife_kimg, rampup, expected
):
    assert ema_beta(batch, images_seen, halflife_kimg, rampup) == pytest.approx(expected, rel=1e-12)
