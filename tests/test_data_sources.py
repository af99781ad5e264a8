"""`--data` sources one by one (`method/data.py`): what each draws, what it records of itself, and
the one line it refuses with, for built-ins, image folders and EDM zips. The pixel scale of
folders and zips is pinned in test_pins.py."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from disback_cli.errors import DisbackError
from disback_cli.evaluation import datasets
from disback_cli.evaluation.datasets import get_dataset
from disback_cli.method.data import open_data
from disback_cli.models.conditioning import NO_CONDITIONS
from disback_cli.store.images import encode_png

CPU = torch.device("cpu")


def draw(data, n: int, seed: int = 0):
    return data.draw(n, torch.Generator().manual_seed(seed), CPU)


def grey(value: int, height: int = 2, width: int = 2) -> np.ndarray:
    return np.full((height, width, 1), value, dtype=np.uint8)


def image_folder(where, images, labels=None):
    """`images` as PNGs named img0.png, img1.png, ... and `labels` (by index) in dataset.json."""
    where.mkdir(parents=True, exist_ok=True)
    names = [f"img{i}.png" for i in range(len(images))]
    for name, image in zip(names, images, strict=True):
        (where / name).write_bytes(encode_png(image))
    if labels is not None:
        entries = [[name, label] for name, label in zip(names, labels, strict=True)]
        (where / "dataset.json").write_text(json.dumps({"labels": entries}))
    return where


def image_zip(path, images, labels=None):
    with zipfile.ZipFile(path, "w") as archive:
        for i, image in enumerate(images):
            archive.writestr(f"img{i}.png", encode_png(image))
        if labels is not None:
            entries = [[f"img{i}.png", label] for i, label in enumerate(labels)]
            archive.writestr("dataset.json", json.dumps({"labels": entries}))
    return path


def empty_file(path):
    path.write_bytes(b"")
    return path


def refusal(spec, shape=(1, 2, 2), label_dim=0) -> str:
    with pytest.raises(DisbackError) as caught:
        open_data(str(spec), shape, label_dim)
    return str(caught.value)


# -- built-ins ------------------------------------------------------------------------------


def test_the_ring_draws_exact_samples_from_the_runs_stream():
    data = open_data("builtin:ring2d", (2,), 0)
    ring = get_dataset("ring2d")
    x, cond = draw(data, 500, seed=3)
    rng = torch.Generator().manual_seed(3)  # the same two draws, by hand
    component = torch.randint(len(ring.weights), (500,), generator=rng)
    expected = ring.means[component] + ring.std * torch.randn(500, 2, generator=rng)
    torch.testing.assert_close(x, expected)
    assert cond is NO_CONDITIONS
    assert not torch.equal(draw(data, 500, seed=4)[0], x)  # the stream, not a fixed set
    assert data.ref.source == "builtin:ring2d" and data.ref.count == 0  # no finite set


def test_a_builtins_identity_follows_its_content(monkeypatch):
    ring = open_data("builtin:ring2d", (2,), 0).ref
    assert ring == open_data("builtin:ring2d", (2,), 0).ref and len(ring.sha256) == 64
    wider = datasets.ring2d(std=0.1)
    monkeypatch.setattr("disback_cli.method.data.get_dataset", lambda name: wider)
    assert open_data("builtin:ring2d", (2,), 0).ref.sha256 != ring.sha256


def test_digits_arrive_with_their_labels_one_hot():
    digits = get_dataset("digits")
    data = open_data("builtin:digits", tuple(digits.data_shape), 10)
    assert data.ref.source == "builtin:digits" and data.ref.count == len(digits.images)
    assert len(data.ref.sha256) == 64
    x, cond = draw(data, 64, seed=1)
    index = torch.randint(len(digits.images), (64,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, digits.images[index])
    one_hot = cond["class_labels"]
    assert one_hot.shape == (64, 10) and torch.equal(one_hot.argmax(1), digits.labels[index])


def test_digits_for_an_unconditional_teacher_carry_no_labels():
    digits = get_dataset("digits")
    x, cond = draw(open_data("builtin:digits", tuple(digits.data_shape), 0), 8)
    assert cond is NO_CONDITIONS and x.shape == (8, *digits.data_shape)


@pytest.mark.parametrize(
    ("spec", "shape", "label_dim", "message"),
    [
        ("builtin:nope", (2,), 0, "--data builtin:nope: no such data set (known: builtin:ring2d, "),
        ("builtin:ring2d", (3,), 0, "samples of shape (2,), the teacher's are (3,)"),
        ("builtin:ring2d", (2,), 10, "--data builtin:ring2d: no classes, the teacher has 10"),
        ("builtin:digits", (1, 8, 8), 4, "--data builtin:digits: 10 classes, the teacher has 4"),
    ],
)
def test_a_builtin_that_does_not_fit_the_teacher_is_refused(spec, shape, label_dim, message):
    assert message in refusal(spec, shape, label_dim)


# -- image folders and zips -----------------------------------------------------------------


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_images_for_an_unconditional_teacher_need_no_labels(tmp_path, container):
    images = [grey(0), grey(255)]
    if container == "folder":
        source = image_folder(tmp_path / "d", images)
    else:
        source = image_zip(tmp_path / "d.zip", images)
    data = open_data(str(source), (1, 2, 2), 0)
    x, cond = draw(data, 32)
    assert cond is NO_CONDITIONS and set(x.flatten().tolist()) == {-1.0, 1.0}
    assert data.ref.source == str(source.absolute()) and data.ref.count == 2


def test_non_square_images_keep_their_height_and_width(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0, 2, 3), grey(9, 2, 3)])
    x, _ = draw(open_data(str(source), (1, 2, 3), 0), 4)
    assert x.shape == (4, 1, 2, 3)
    assert "images of shape (1, 2, 3) (C, H, W), the teacher's are (1, 3, 2)" in refusal(
        source, (1, 3, 2)
    )


def test_a_folders_identity_is_its_listing_of_names_and_contents(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    first = open_data(str(source), (1, 2, 2), 0).ref.sha256
    assert len(first) == 64 and open_data(str(source), (1, 2, 2), 0).ref.sha256 == first
    (source / "img1.png").write_bytes(encode_png(grey(2)))
    changed = open_data(str(source), (1, 2, 2), 0).ref.sha256
    (source / "img1.png").rename(source / "other.png")
    renamed = open_data(str(source), (1, 2, 2), 0).ref.sha256
    assert len({first, changed, renamed}) == 3


def test_a_zips_identity_is_its_sha256(tmp_path):
    import hashlib

    source = image_zip(tmp_path / "d.zip", [grey(0), grey(1)])
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    assert open_data(str(source), (1, 2, 2), 0).ref.sha256 == expected


@pytest.mark.parametrize("odd", [0, 2])
def test_every_image_is_checked_before_the_run_starts(tmp_path, odd):
    """The first image sets the shape; one of another size anywhere (the first included) is
    refused, naming it."""
    images = [grey(0), grey(1), grey(2)]
    images[odd] = grey(3, 3, 3)
    source = image_folder(tmp_path / "d", images)
    message = refusal(source)
    if odd == 0:
        assert "images of shape (1, 3, 3) (C, H, W), the teacher's are (1, 2, 2)" in message
    else:
        assert f"{source}/img{odd}.png: its size differs from the first image's" in message


def test_an_image_changed_after_the_check_is_refused_when_drawn(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    data = open_data(str(source), (1, 2, 2), 0)
    (source / "img1.png").write_bytes(encode_png(grey(1, 3, 3)))
    with pytest.raises(DisbackError, match=r"/img1\.png: size \(3, 3, 1\) differs"):
        draw(data, 16)


@pytest.mark.parametrize("which", [0, 1])
def test_an_unreadable_image_is_named(tmp_path, which):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    (source / f"img{which}.png").write_bytes(b"not a png")
    assert f"{source}/img{which}.png: not a readable image" in refusal(source)


def test_an_unreadable_image_drawn_later_is_named(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    data = open_data(str(source), (1, 2, 2), 0)
    (source / "img0.png").write_bytes(b"not a png")
    (source / "img1.png").write_bytes(b"not a png")
    with pytest.raises(DisbackError, match=r"/img[01]\.png: not a readable image"):
        draw(data, 4)


def test_links_in_a_folder_are_not_followed(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(255)])
    outside = image_folder(tmp_path / "outside", [grey(7), grey(7)])
    (source / "link.png").symlink_to(outside / "img0.png")
    data = open_data(str(source), (1, 2, 2), 0)
    assert data.ref.count == 2 and set(draw(data, 32)[0].flatten().tolist()) == {-1.0, 1.0}


def test_special_files_are_refused_with_their_kind(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    os.mkfifo(source / "fifo.png")
    assert "fifo.png: not a regular file, expected a image" in refusal(source)
    os.unlink(source / "fifo.png")
    os.mkfifo(source / "dataset.json")
    message = refusal(source, label_dim=2)
    assert "dataset.json: not a regular file, expected a labels file" in message
    os.mkfifo(tmp_path / "fifo.zip")
    assert "fifo.zip: not a regular file, expected a dataset zip" in refusal(tmp_path / "fifo.zip")


def test_damaged_zip_members_are_named(tmp_path):
    source = image_zip(tmp_path / "d.zip", [grey(0), grey(1)], labels=[0, 1])
    raw = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        infos = {info.filename: info for info in archive.infolist()}
    for name in ("img1.png", "dataset.json"):  # spoil the stored bytes: the CRC check fails
        info = infos[name]
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        raw[start] ^= 0xFF
        damaged = tmp_path / f"{name}.zip"
        damaged.write_bytes(bytes(raw))
        raw[start] ^= 0xFF
        label_dim = 2 if name == "dataset.json" else 0
        assert f"{damaged}:{name}: unreadable zip member" in refusal(damaged, label_dim=label_dim)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "missing: no such file or folder"),
        (lambda p: empty_file(p / "x.npz"), "expected builtin:NAME, an image folder or a .zip"),
        (lambda p: image_folder(p / "one", [grey(0)]), "one: 1 images; at least 2 are needed"),
    ],
)
def test_what_is_not_a_data_set_is_refused(tmp_path, make, message):
    assert message in refusal(make(tmp_path))


def test_image_files_for_a_vector_teacher_are_refused(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    assert "image files, but the teacher's samples are vectors" in refusal(source, (2,))


# -- labels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_a_class_conditional_teacher_needs_labels(tmp_path, container):
    images = [grey(0), grey(1)]
    if container == "folder":
        source = image_folder(tmp_path / "d", images)
    else:
        source = image_zip(tmp_path / "d.zip", images)
    message = refusal(source, label_dim=3)
    assert "no dataset.json with labels; the teacher is class-conditional (3 classes)" in message


def test_labels_one_hot_have_the_teachers_width_whatever_is_drawn(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)], labels=[0, 1])
    _, cond = draw(open_data(str(source), (1, 2, 2), 10), 16)
    assert cond["class_labels"].shape == (16, 10)


@pytest.mark.parametrize(
    ("labels", "bad"), [([0, 3], 1), ([3, 0], 0), ([-1, 0], 0), ([0, 1.0], 1), ([True, 0], 0)]
)
def test_a_label_outside_the_teachers_classes_is_refused(tmp_path, labels, bad):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)], labels=labels)
    assert f"image img{bad}.png has no label in 0..2" in refusal(source, label_dim=3)


def test_an_image_without_a_label_is_refused_with_its_name_cut_to_100_characters(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)], labels=[0, 1])
    long_name = "x" * 150 + ".png"
    (source / long_name).write_bytes(encode_png(grey(2)))
    message = refusal(source, label_dim=2)
    assert f"image {long_name[:100]} has no label" in message and long_name[:101] not in message


@pytest.mark.parametrize("text", ["{}", "[]", '{"labels": 3}', '{"labels": [[1]]}', "nan"])
def test_a_malformed_labels_file_is_refused(tmp_path, text):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    (source / "dataset.json").write_text(text)
    assert f"--data {source}: malformed dataset.json" in refusal(source, label_dim=2)
    assert open_data(str(source), (1, 2, 2), 0).ref.count == 2  # unread without classes


def test_an_image_swapped_for_a_fifo_after_the_check_is_refused_when_drawn(tmp_path):
    source = image_folder(tmp_path / "d", [grey(0), grey(1)])
    data = open_data(str(source), (1, 2, 2), 0)
    (source / "img1.png").unlink()
    os.mkfifo(source / "img1.png")
    with pytest.raises(DisbackError, match=r"img1\.png: not a regular file, expected a image$"):
        draw(data, 16)
