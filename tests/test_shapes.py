"""The built-in shapes data set and its exact mode statistics (issue 18's harder testbed), pinned
on hand-built sets whose answers are counted by construction."""

from __future__ import annotations

import json
import math

import pytest
import torch

from disback_cli.evaluation.datasets import get_dataset
from disback_cli.evaluation.shapes import (
    BACKGROUND,
    COLOURS,
    MODES,
    POSITIONS,
    RADIUS,
    SEED,
    SHAPES,
    SIZE,
    SUPERSAMPLE,
    factors,
    heldout_floor,
    nearest_mode,
    render,
    shapes_scores,
    split,
)


def test_every_real_image_is_assigned_to_its_own_mode_and_class():
    images, labels = (t[:2000] for t in split("heldout"))
    mode, _ = nearest_mode(images)
    assert torch.equal(mode // 4, labels)  # shape and colour: the class
    scores = shapes_scores(images, labels)
    assert scores["precision"] >= 0.998 and scores["label_accuracy"] == 1.0
    assert scores["modes_covered"] == MODES and scores["mode_tv"] < 0.1
    assert 0.8 < scores["template_distance"] < 1.4


def test_blur_mode_dropping_and_wrong_classes_are_caught():
    images, labels = (t[:1000] for t in split("heldout"))
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    assert shapes_scores(blurred)["precision"] < 0.2
    mean = images.mean(dim=0, keepdim=True).expand(100, -1, -1, -1)
    assert shapes_scores(mean)["precision"] == 0.0  # what a collapsed one-step G0 looks like
    red = images[labels % 4 == 0]  # colour 0 only: 16 of the 64 modes
    dropped = shapes_scores(red)
    assert dropped["modes_covered"] == 16 and dropped["mode_tv"] > 0.7
    wrong = shapes_scores(images, (labels + 1) % 16)
    assert wrong["precision"] >= 0.998 and wrong["label_accuracy"] == 0.0


def test_the_split_is_fixed_and_the_factors_render_as_named():
    data = get_dataset("shapes")
    assert data.images.shape == (20000, 3, 16, 16) and data.num_classes == 16
    assert torch.equal(split("heldout")[0], split("heldout")[0])  # fixed seeds: the same data
    square, disc = render(torch.tensor([0, 1]), torch.tensor([2, 2]), torch.tensor([0, 0]))
    assert (square > disc + 0.1).any()  # the square's corners, outside the disc
    assert square[:, 12:, 12:].max() < -0.79  # top-left position: the bottom right is background


def test_samples_of_the_shapes_teacher_are_scored_with_their_labels(cli, tmp_path):
    out = tmp_path / "teacher"
    assert (
        cli("sample", "--teacher", "builtin:shapes", "--steps", "6", "-n", "16", "--out", out).code
        == 0
    )
    result = cli("evaluate", out, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "shapes" and report["floor"]["precision"] == 1.0
    assert 0 <= report["results"][0]["label_accuracy"] <= 1  # labels came from dataset.json


def templates(modes: list[int]) -> torch.Tensor:
    """Each mode's own variant (centred, full size, brightness 0.97: on the bank's grid)."""
    m = torch.tensor(modes)
    n = len(modes)
    return render(
        m // 16, (m // 4) % 4, m % 4, torch.zeros(n, 2), torch.ones(n), 0.97 * torch.ones(n)
    )


def test_scores_of_hand_built_sets_are_the_counts_they_were_built_from():
    # 32 modes x 4 templates, plus 32 images of mode 40 under +-0.5 noise: nearest to mode 40,
    # but far beyond real images' distances, so neither precise nor counted as covering it.
    modes = [m for m in range(32) for _ in range(4)]
    signs = torch.randint(2, (32, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    noisy = templates([40] * 32) + (signs - 0.5)
    images = torch.cat([templates(modes), noisy])
    found, distance = nearest_mode(images)
    assert found.tolist() == modes + [40] * 32
    assert distance[:128].max() < 0.05  # 0 up to cdist rounding; real images ~1.1
    assert (distance[128:] <= 768**0.5 / 2 + 1e-3).all()  # at most the noise's own norm
    labels = torch.tensor(modes + [40] * 32) // 4
    labels[:64] = (labels[:64] + 1) % 16  # half the precise ones were drawn for another class
    scores = shapes_scores(images, labels)
    assert scores["n"] == 160 and scores["precision"] == 128 / 160
    assert scores["modes_covered"] == 32
    assert abs(scores["mode_tv"] - 0.5) < 1e-12  # half the mass sits on the missing 32 modes
    assert scores["label_accuracy"] == 0.5  # the noisy images' right labels are not counted
    expected = float(distance.double().sum() / 160)
    assert abs(scores["template_distance"] - expected) < 1e-5
    assert 0.1 * 768**0.5 / 2 < scores["template_distance"] < 0.2 * 768**0.5 / 2 + 0.05


def test_a_mode_is_covered_from_a_fifth_of_its_fair_share():
    # 320 precise samples: one sample is exactly a fifth of 1/64, so it counts; 0 does not.
    modes = [0] * 300 + [1] * 19 + [2]
    scores = shapes_scores(templates(modes))
    assert scores["precision"] == 1.0 and scores["modes_covered"] == 3
    fewer = shapes_scores(templates([0] * 320 + [2]))  # 1 of 321: below a fifth
    assert fewer["modes_covered"] == 1


def test_the_jitters_are_drawn_per_image_within_their_ranges():
    shape, colour, position, offset, scale, brightness = factors(
        2000, torch.Generator().manual_seed(3)
    )
    assert offset.shape == (2000, 2) and len(set(offset[:, 0].tolist())) == 2000
    assert -0.75 <= offset.min() < -0.7 and 0.7 < offset.max() <= 0.75  # +-0.75 px
    assert 0.85 <= scale.min() < 0.86 and 1.14 < scale.max() <= 1.15
    assert 0.85 <= brightness.min() < 0.86 and 0.99 < brightness.max() <= 1.0
    for index in (shape, colour, position):
        assert set(index.tolist()) == {0, 1, 2, 3}


def test_only_the_two_named_splits_exist():
    with pytest.raises(ValueError, match="no shapes split 'test'"):
        split("test")


def test_the_held_out_floor_scores_real_images_with_their_labels():
    images, labels = split("heldout")
    floor = heldout_floor(40)
    assert floor == shapes_scores(images[:40], labels[:40])
    assert floor["n"] == 40 and floor["label_accuracy"] == 1.0


@pytest.mark.parametrize("count", [0, 1])
def test_fewer_than_two_images_or_another_size_are_refused(count):
    expected = rf"at least 2 images of 3x16x16, got \({count}, 3, 16, 16\)"
    with pytest.raises(ValueError, match=expected):
        shapes_scores(templates([0])[:count])
    with pytest.raises(ValueError, match=r"got \(5, 3, 8, 8\)"):
        shapes_scores(torch.zeros(5, 3, 8, 8))
    assert shapes_scores(templates([0, 1]))["n"] == 2


def test_a_sample_exactly_at_the_precision_bound_is_precise(monkeypatch):
    images = templates([5, 6]) + 0.3  # both off their templates by the same distance
    _, distance = nearest_mode(images)
    monkeypatch.setattr(
        "disback_cli.evaluation.shapes.precise_distance", lambda: float(distance[0])
    )
    assert shapes_scores(images)["precision"] == (1.0 if distance[1] <= distance[0] else 0.5)
    assert shapes_scores(images[:1].repeat(2, 1, 1, 1))["precision"] == 1.0


def test_one_precise_sample_is_all_of_the_balance_and_of_the_label_accuracy():
    noise = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = torch.cat([templates([9]), noise])
    scores = shapes_scores(images, torch.tensor([9 // 4, 0]))
    assert scores["precision"] == 0.5 and scores["modes_covered"] == 1
    assert scores["mode_tv"] == pytest.approx(63 / 64)  # all the mass on 1 mode of 64
    assert scores["label_accuracy"] == 1.0
    assert scores["modes_total"] == 64


# -- the rasteriser: 4 x 4 samples a pixel, at odd eighths of a pixel from a pixel's corner ----


def covered(images: torch.Tensor, colour: int = 0, brightness: float = 1.0) -> torch.Tensor:
    """Per image, the pixels' summed coverage, read back from the red channel."""
    red = COLOURS[list(COLOURS)[colour]][0] * brightness
    return ((images[:, 0] - BACKGROUND) / (red - BACKGROUND)).flatten(1).sum(dim=1)


def first_position(n: int, **jitters) -> torch.Tensor:
    """Every shape (n of them) in red at the top-left position."""
    zeros = torch.zeros(n, dtype=torch.long)
    return render(torch.arange(n), zeros, zeros, **jitters)


@pytest.mark.parametrize("scale", [0.85, 1.0, 1.15])
def test_each_shape_covers_its_area(scale):
    """Square 4r^2, disc pi r^2, triangle (apex up, base and height 2r) 2r^2, cross of bars 2r/3
    wide 20 r^2 / 9, up to the lattice's error: half a sample spacing along the outline."""
    r, n = RADIUS * scale, len(SHAPES)
    images = first_position(n, scale=torch.full((n,), scale))
    areas = torch.tensor([4 * r**2, math.pi * r**2, 2 * r**2, 20 * r**2 / 9])
    outlines = torch.tensor([8 * r, 2 * math.pi * r, (2 + 2 * math.sqrt(5)) * r, 8 * r])
    error = (covered(images) - areas).abs()
    assert (error <= outlines / (2 * SUPERSAMPLE)).all(), (covered(images), areas)


def test_sample_points_on_an_edge_are_inside():
    """At scale 7/8 the half-width is 21/8 and a cross bar's 7/8: odd eighths, where samples
    lie. Counted on the sample lattice: the square 22 x 22 samples, the cross 2 (22 x 8) - 8 x 8,
    the triangle 2 (1 + 1 + 2 + 2 + ... + 11) (row k from the apex holds the odd m <= k)."""
    n = len(SHAPES)
    images = render(
        torch.arange(n),
        torch.zeros(n, dtype=torch.long),
        torch.zeros(n, dtype=torch.long),
        scale=torch.full((n,), 7 / 8),
    )
    square, _, triangle, cross = covered(images).tolist()
    per_pixel = SUPERSAMPLE**2
    rows = sum(2 * ((k + 1) // 2) for k in range(22))
    assert (square, triangle, cross) == pytest.approx(
        (22 * 22 / per_pixel, rows / per_pixel, (2 * 22 * 8 - 8 * 8) / per_pixel), abs=1e-4
    )


def test_a_shape_sits_at_its_position_plus_its_offset_in_its_colour_and_brightness():
    offset = torch.tensor([[0.5, -0.25], [0.0, 0.0]])
    images = render(
        torch.tensor([0, 1]),
        torch.tensor([2, 2]),
        torch.tensor([1, 2]),
        offset=offset,
        brightness=torch.tensor([0.9, 1.0]),
    )
    rows = torch.arange(SIZE, dtype=torch.float32) + 0.5  # pixel centres
    weight = images[:, 0] - BACKGROUND
    centroid = torch.stack(
        [(weight.sum(2) * rows).sum(1), (weight.sum(1) * rows).sum(1)], dim=1
    ) / weight.flatten(1).sum(1, keepdim=True)
    expected = torch.tensor(POSITIONS)[torch.tensor([1, 2])] + offset
    assert torch.allclose(centroid, expected, atol=0.01), centroid
    inside = images[0, :, 5, 11]  # a pixel the square covers whole
    assert torch.allclose(inside, torch.tensor(COLOURS[list(COLOURS)[2]]) * 0.9)


def test_the_held_out_split_is_drawn_from_the_next_seed():
    images, labels = split("heldout")
    shape, colour, position, offset, scale, brightness = factors(
        len(images), torch.Generator().manual_seed(SEED + 1)
    )
    assert len(images) == 5000 and torch.equal(labels, shape * 4 + colour)
    assert torch.equal(
        images[:8],
        render(shape[:8], colour[:8], position[:8], offset[:8], scale[:8], brightness[:8]),
    )
