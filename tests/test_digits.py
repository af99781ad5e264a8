"""builtin:digits: data, the FD-digits detector, the teacher, and the demo."""

import json

import numpy as np
import pytest
import torch

from disback_cli.evaluation.datasets import digits, digits_uint8
from disback_cli.evaluation.digits import DigitsDetector, digits_scores, heldout_floor
from disback_cli.method.sampling import HeunSampler, seeded_noise
from disback_cli.models.conditioning import condition_source
from disback_cli.models.teachers import open_teacher
from disback_cli.stages.demo import run_demo
from disback_cli.store.images import to_uint8


def test_digits_data_splits_are_disjoint_and_complete():
    train, train_labels = digits_uint8("train")
    held, _ = digits_uint8("heldout")
    assert train.shape == (1000, 8, 8, 1) and held.shape == (797, 8, 8, 1)
    assert set(np.unique(train_labels)) == set(range(10))
    data = digits("train")
    assert data.data_shape == (1, 8, 8) and data.images.min() >= -1 and data.images.max() <= 1


def test_fd_digits_separates_real_from_broken_images():
    detector = DigitsDetector()
    real = heldout_floor(detector, 797)
    assert real["fd_digits"] < 15 and real["classes_covered"] == real["classes_total"] == 10
    noise = np.random.default_rng(0).integers(0, 256, (797, 8, 8, 1)).astype(np.uint8)
    assert digits_scores(noise, detector)["fd_digits"] > 300
    held, labels = digits_uint8("heldout")
    only_low = held[labels < 5]
    dropped = digits_scores(only_low, detector)
    assert dropped["classes_covered"] <= 6 and dropped["fd_digits"] > 3 * real["fd_digits"]


@pytest.fixture(scope="module")
def teacher_samples():
    teacher = open_teacher("builtin:digits")
    z, cond = seeded_noise(range(300), (1, 8, 8), condition_source(10))
    with torch.no_grad():
        images = to_uint8(HeunSampler(teacher.denoiser, 18)(z, **cond))
    return images, cond["class_labels"].argmax(1).numpy()


def test_teacher_heun_samples_are_recognisable_digits_of_the_requested_class(teacher_samples):
    images, requested = teacher_samples
    detector = DigitsDetector()
    scores = digits_scores(images, detector)
    floor = heldout_floor(detector, len(images))
    assert scores["classes_covered"] == 10
    assert scores["fd_digits"] < 3 * floor["fd_digits"]
    predicted = detector.probabilities(images).argmax(1)
    assert (predicted == requested).mean() > 0.85


def test_quick_demo_improves_on_g0(tmp_path):
    summary = run_demo(tmp_path / "demo", quick=True, device="cpu")
    rows = {row["samples"]: row for row in summary["rows"]}
    g0 = rows["G0, 1 step"]["fd_digits"]
    distilled = rows["distilled, 1 step"]["fd_digits"]
    assert distilled < 0.5 * g0
    assert (tmp_path / "demo" / "grids.png").exists() and (
        tmp_path / "demo" / "curves.png"
    ).exists()
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["n"] == 200


def test_sample_teacher_and_evaluate_digits_without_reference(cli, tmp_path):
    result = cli(
        "sample",
        "--teacher",
        "builtin:digits",
        "--steps",
        "8",
        "-n",
        "40",
        "--out",
        tmp_path / "t",
        "--device",
        "cpu",
    )
    assert result.code == 0, result.stderr
    result = cli("evaluate", tmp_path / "t", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric"] == "FD-digits" and report["kind"] == "digits"
    assert report["results"][0]["n"] == 40 and report["floor"]["n"] == 40
    assert report["detector"]["name"] == "digits-cnn"
