"""Best-of-K sampling against a verifier whose scores the test knows: the chosen candidate is the
highest-scoring one of the seed's own K, candidate 0 is the seed's plain sample, and the scoring
noise sits at the verifier's noise levels (times sigma_data)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disback_cli.method.sampling import VERIFIER_SIGMAS, best_of_k, seeded_noise
from disback_cli.models.conditioning import ClassLabels

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
    return x, cond, torch.stack(scores).mean(dim=0)


def test_best_of_k_picks_the_highest_known_score_of_the_seeds_own_candidates():
    seeds = list(range(12))
    x, cond, score = best_of_k(
        Generator(), verifier, seeds, SHAPE, ClassLabels(3), 6, torch.device("cpu")
    )
    picked_other_than_first = 0
    for i, seed in enumerate(seeds):
        candidates, seed_cond, scores = expected(seed, 6)
        best = int(scores.argmax())
        picked_other_than_first += best != 0
        torch.testing.assert_close(x[i], candidates[best])
        torch.testing.assert_close(score[i], scores[best])
        assert torch.equal(cond["class_labels"][i], seed_cond["class_labels"][0])
    assert picked_other_than_first >= 6  # the choice is not just candidate 0


def test_one_candidate_is_plain_sampling():
    seeds = [3, 8, 21]
    x, cond, _ = best_of_k(
        Generator(), verifier, seeds, SHAPE, ClassLabels(3), 1, torch.device("cpu")
    )
    z, plain_cond = seeded_noise(seeds, SHAPE, ClassLabels(3))
    torch.testing.assert_close(x, Generator()(z, plain_cond["class_labels"]))
    assert torch.equal(cond["class_labels"], plain_cond["class_labels"])
