"""Best-of-K sampling against a verifier whose scores the test knows: the candidates are the
seed's own K, candidate 0 is the seed's plain sample, the scoring noise sits at the verifier's
noise levels (times sigma_data), and the rules choose as they say: `argmax` the highest score,
`resample` in proportion to exp(score) from the seed's stream. With the exact density ratio on
the ring, resampling approaches the data as K grows while argmax collapses the modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from disback_cli.evaluation.datasets import ring2d
from disback_cli.evaluation.ground_truth import reference_sample
from disback_cli.evaluation.vectors import mmd2_rbf
from disback_cli.method.sampling import VERIFIER_SIGMAS, best_of_k, seeded_noise
from disback_cli.models.conditioning import ClassLabels, Unconditional

SHAPE = (4,)
SIGMA_DATA = 0.7


class Generator(nn.Module):
    """x = 2 z + its class as a one-hot offset, so a wrong label shows in the sample."""

    def __init__(self) -> None:
        super().__init__()
        self.denoiser = nn.Module()
        self.denoiser.sigma_data = SIGMA_DATA

    def forward(self, z, class_labels):
        return 2 * z + F.pad(class_labels, (0, 1)) * 3


def verifier(x, sigma, class_labels):
    """Known score: near the point (1, 1, 1, 1), weighted by the noise level it is given."""
    return -((x - 1) ** 2).sum(dim=1) * (1 + torch.as_tensor(sigma)) + class_labels[:, 0]


def expected(seed: int, k: int):
    """The candidates and their scores, drawn in the order the docstring states."""
    rng = torch.Generator().manual_seed(seed)
    z = [torch.randn(SHAPE, generator=rng)]
    cond = ClassLabels(3).of_seed(rng)
    z += [torch.randn(SHAPE, generator=rng) for _ in range(k - 1)]
    noise = torch.randn(len(VERIFIER_SIGMAS), k, *SHAPE, generator=rng)
    labels = cond["class_labels"].expand(k, 3)
    x = Generator()(torch.stack(z), labels)
    scores = [
        verifier(x + s * SIGMA_DATA * noise[i], s * SIGMA_DATA, labels)
        for i, s in enumerate(VERIFIER_SIGMAS)
    ]
    return x, cond, torch.stack(scores).mean(dim=0), rng


def test_argmax_picks_the_highest_known_score_of_the_seeds_own_candidates():
    seeds = list(range(12))
    x, cond, score = best_of_k(
        Generator(), verifier, seeds, SHAPE, ClassLabels(3), 6, torch.device("cpu"), "argmax"
    )
    picked_other_than_first = 0
    for i, seed in enumerate(seeds):
        candidates, seed_cond, scores, _ = expected(seed, 6)
        best = int(scores.argmax())
        picked_other_than_first += best != 0
        torch.testing.assert_close(x[i], candidates[best])
        torch.testing.assert_close(score[i], scores[best])
        assert torch.equal(cond["class_labels"][i], seed_cond["class_labels"][0])
    assert picked_other_than_first >= 6  # the choice is not just candidate 0


def test_resample_draws_in_proportion_to_the_ratio_from_the_seeds_stream():
    """The softmax of the scores is the rule's law; the draw continues the seed's stream, so a
    seed chooses the same candidate every time and different seeds choose differently."""
    seeds = list(range(40))
    x, _, score = best_of_k(Generator(), verifier, seeds, SHAPE, ClassLabels(3), 6, "cpu")
    picks, not_the_best = [], 0
    for i, seed in enumerate(seeds):
        candidates, _, scores, rng = expected(seed, 6)
        weights = torch.softmax(scores.double(), dim=0)
        pick = int(torch.multinomial(weights, 1, generator=rng))
        torch.testing.assert_close(x[i], candidates[pick])
        torch.testing.assert_close(score[i], scores[pick])
        picks.append(pick)
        not_the_best += pick != int(scores.argmax())
    assert len(set(picks)) >= 4 and not_the_best >= 3  # a draw, not a fixed choice


@pytest.mark.parametrize("rule", ["resample", "argmax"])
def test_one_candidate_is_plain_sampling(rule):
    seeds = [3, 8, 21]
    x, cond, _ = best_of_k(
        Generator(), verifier, seeds, SHAPE, ClassLabels(3), 1, torch.device("cpu"), rule
    )
    z, plain_cond = seeded_noise(seeds, SHAPE, ClassLabels(3))
    torch.testing.assert_close(x, Generator()(z, plain_cond["class_labels"]))
    assert torch.equal(cond["class_labels"], plain_cond["class_labels"])


RING = ring2d()
TOO_WIDE = 1.5 * RING.std  # the generator's modes: right places, 1.5 times too wide


class RingGenerator(nn.Module):
    """An exact sample of the ring with modes TOO_WIDE: z's angle picks the mode (its sector) and,
    with z's norm, the offset, which is then a standard 2-D normal independent of the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.denoiser = nn.Module()
        self.denoiser.sigma_data = 0.5

    def forward(self, z):
        sector = torch.atan2(z[:, 1], z[:, 0]) % (2 * math.pi) * len(RING.means) / (2 * math.pi)
        mode = sector.floor().long().clamp(max=len(RING.means) - 1)
        angle = 2 * math.pi * (sector - mode)
        offset = z.norm(dim=1, keepdim=True) * torch.stack([angle.cos(), angle.sin()], dim=1)
        return RING.means[mode] + TOO_WIDE * offset


def exact_log_ratio(x, sigma):
    """log p_data,sigma(x) - log p_G,sigma(x) of the two mixtures, both noised at sigma."""

    def log_density(std):
        var = std**2 + sigma**2
        sq_dist = torch.cdist(x, RING.means) ** 2
        log_mix = torch.logsumexp(RING.weights.log() - sq_dist / (2 * var), dim=1)
        return log_mix - math.log(2 * math.pi * var)

    return log_density(RING.std) - log_density(TOO_WIDE)


def test_resampling_approaches_the_ring_as_k_grows_and_argmax_collapses_its_modes():
    """The issue's measurement, with the exact ratio: resampling at K = 4 and 16 beats plain
    sampling; argmax at K = 16 shrinks every mode and ends worse than plain sampling."""
    seeds, reference = range(1000), reference_sample("ring2d", 1000)

    def spread_and_mmd(k, rule):
        x, _, _ = best_of_k(
            RingGenerator(), exact_log_ratio, seeds, (2,), Unconditional(), k, "cpu", rule
        )
        offsets = x - RING.means[RING.nearest_mode(x)[0]]
        return float(offsets.std()), mmd2_rbf(x, reference)

    (plain_spread, plain), (_, four), (spread, sixteen) = (
        spread_and_mmd(k, "resample") for k in (1, 4, 16)
    )
    argmax_spread, argmax_sixteen = spread_and_mmd(16, "argmax")
    assert sixteen < four < plain
    assert argmax_sixteen > plain
    assert abs(plain_spread - TOO_WIDE) < 0.01 and abs(spread - RING.std) < 0.02
    assert argmax_spread < 0.6 * RING.std
