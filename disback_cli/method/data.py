"""Real data, for objectives that learn from it instead of from a teacher's score (DiffRatio).

`--data` names a built-in data set (`builtin:ring2d`: exact samples of the ring; `builtin:digits`
and `builtin:shapes`: their training splits) or a folder or EDM dataset zip of images (labels from
its `dataset.json`, when the teacher is class-conditional). Batches are drawn from the run's random
stream, so a resumed run draws the same ones; image files are read a batch at a time, never the
whole set into memory. The data's identity (the built-in name and content hash, or the zip's
sha256, or the sha256 of a folder's listing) goes into the run's manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.evaluation.datasets import DATASETS, GaussianMixture, get_dataset
from disback_cli.evaluation.image_io import EXTENSIONS, MAX_IMAGE_BYTES, _decode
from disback_cli.models.conditioning import NO_CONDITIONS, Conditioning
from disback_cli.store.archives import open_zip, read_member
from disback_cli.store.fileio import hash_regular_file, parse_json, read_regular_file

BUILTIN = "builtin:"
MAX_DATA_BYTES = 1 << 40
MAX_LABELS_BYTES = 1 << 30


@dataclass(frozen=True)
class DataRef:
    """What a manifest records of the data a run learned from."""

    source: str
    sha256: str
    count: int


class DataSource:
    """Batches of real samples x0 in the teacher's data space (images in [-1, 1]) and their
    conditions (one-hot class labels for a class-conditional teacher)."""

    def __init__(
        self,
        ref: DataRef,
        count: int,
        read: Callable[[list[int]], tuple[torch.Tensor, list]],
        label_dim: int,
        exact: GaussianMixture | None = None,
        conditioned: bool = False,
    ) -> None:
        self.ref, self.count, self._read, self.label_dim = ref, count, read, label_dim
        self.exact = exact
        self.conditioned = conditioned  # `read` gives the conditions themselves (captions)

    def draw(self, n: int, rng: torch.Generator, device: torch.device):
        """n samples and their conditions, drawn from `rng` (the run's stream)."""
        if self.exact is not None:  # the ring: exact samples, computed where the stream lives
            component = torch.randint(len(self.exact.weights), (n,), generator=rng, device=device)
            noise = torch.randn(n, *self.exact.data_shape, generator=rng, device=device)
            x = self.exact.means.to(device)[component] + self.exact.std * noise
            return x, NO_CONDITIONS
        index = torch.randint(self.count, (n,), generator=rng, device=device).tolist()
        x, labels = self._read(index)
        if self.conditioned:
            return x.to(device), labels.to(device)
        cond = NO_CONDITIONS
        if self.label_dim:
            one_hot = F.one_hot(torch.tensor(labels, device=device), self.label_dim).float()
            cond = Conditioning({"class_labels": one_hot})
        return x.to(device), cond


def _builtin(name: str, data_shape: tuple[int, ...], label_dim: int) -> DataSource:
    if name not in DATASETS:
        raise ConfigError(
            f"--data {BUILTIN}{name}: no such data set (known: "
            f"{', '.join(BUILTIN + d for d in DATASETS)})"
        )
    data = get_dataset(name)
    if tuple(data.data_shape) != tuple(data_shape):
        raise ConfigError(
            f"--data {BUILTIN}{name}: samples of shape {tuple(data.data_shape)}, "
            f"the teacher's are {tuple(data_shape)}"
        )
    if isinstance(data, GaussianMixture):
        content = json.dumps([data.means.tolist(), data.std, data.weights.tolist()]).encode()
        ref = DataRef(BUILTIN + name, hashlib.sha256(content).hexdigest(), 0)
        _check_classes(label_dim, 0, f"{BUILTIN}{name}")
        return DataSource(ref, 0, lambda index: None, 0, exact=data)
    _check_classes(label_dim, data.num_classes, f"{BUILTIN}{name}")
    digest = hashlib.sha256(data.images.numpy().tobytes() + data.labels.numpy().tobytes())
    ref = DataRef(BUILTIN + name, digest.hexdigest(), len(data.images))

    def read(index: list[int]) -> tuple[torch.Tensor, list]:
        return data.images[index], data.labels[index].tolist()

    return DataSource(ref, len(data.images), read, label_dim)


def _check_classes(label_dim: int, classes: int, where: str) -> None:
    if label_dim and classes != label_dim:
        raise ConfigError(f"--data {where}: {classes or 'no'} classes, the teacher has {label_dim}")


def _labels(raw: bytes | None, names: list[str], where: str, label_dim: int) -> list[int] | None:
    """The class of every image from an EDM `dataset.json`, checked against the teacher's."""
    if not label_dim:
        return None
    if raw is None:
        raise ConfigError(
            f"--data {where}: no dataset.json with labels; the teacher is "
            f"class-conditional ({label_dim} classes)"
        )
    try:
        entries = parse_json(raw)["labels"]
        table = {str(name): label for name, label in entries}
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--data {where}: malformed dataset.json") from None
    labels = [table.get(name) for name in names]
    bad = next(
        (
            n
            for n, y in zip(names, labels, strict=True)
            if type(y) is not int or not 0 <= y < label_dim
        ),
        None,
    )
    if bad is not None:
        raise ConfigError(f"--data {where}: image {bad[:100]} has no label in 0..{label_dim - 1}")
    return labels


def _image_files(path: Path, data_shape: tuple[int, ...], label_dim: int) -> DataSource:
    """A folder or EDM zip of images, read batch by batch."""
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS and not p.is_symlink()
        )
        names = [str(p.relative_to(path)) for p in files]
        hashes = [hash_regular_file(p, MAX_IMAGE_BYTES, "image") for p in files]
        listing = json.dumps([[n, h] for n, h in zip(names, hashes, strict=True)])
        digest = hashlib.sha256(listing.encode()).hexdigest()
        labels_file = path / "dataset.json"
        raw = None
        if labels_file.exists() or labels_file.is_symlink():
            raw = read_regular_file(labels_file, MAX_LABELS_BYTES, "labels file")

        def fetch(i: int) -> bytes:
            return read_regular_file(files[i], MAX_IMAGE_BYTES, "image")

    else:
        digest = hash_regular_file(path, MAX_DATA_BYTES, "dataset zip")
        archive = open_zip(path, "dataset zip")
        names = sorted(n for n in archive.namelist() if Path(n).suffix.lower() in EXTENSIONS)
        raw = None
        if "dataset.json" in archive.namelist():
            raw = read_member(archive, "dataset.json", MAX_LABELS_BYTES, f"{path}:dataset.json")

        def fetch(i: int) -> bytes:
            return read_member(archive, names[i], MAX_IMAGE_BYTES, f"{path}:{names[i]}")

    if len(names) < 2:
        raise ConfigError(f"--data {path}: {len(names)} images; at least 2 are needed")
    labels = _labels(raw, names, str(path), label_dim)
    first = _decode(fetch(0), f"{path}/{names[0]}")
    shape = (first.shape[2], first.shape[0], first.shape[1])
    if shape != tuple(data_shape):
        raise ConfigError(
            f"--data {path}: images of shape {shape} (C, H, W), the teacher's are "
            f"{tuple(data_shape)}"
        )
    for i in range(1, len(names)):  # every image, before the run writes anything
        if _decode(fetch(i), f"{path}/{names[i]}").shape != first.shape:
            raise ConfigError(f"--data {path}/{names[i]}: its size differs from the first image's")

    def read(index: list[int]) -> tuple[torch.Tensor, list]:
        arrays = []
        for i in index:
            image = _decode(fetch(i), f"{path}/{names[i]}")
            if image.shape != first.shape:
                raise DisbackError(f"--data {path}/{names[i]}: size {image.shape} differs")
            arrays.append(image)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, [labels[i] for i in index] if labels is not None else []

    return DataSource(
        DataRef(str(path.absolute()), digest, len(names)), len(names), read, label_dim
    )


def open_data(spec: str, data_shape: tuple[int, ...], label_dim: int) -> DataSource:
    """The data set `spec` (see the module's docstring), checked against the teacher's data
    shape and classes; refused in one line otherwise."""
    if spec.startswith(BUILTIN):
        return _builtin(spec[len(BUILTIN) :], data_shape, label_dim)
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"--data {spec}: no such file or folder")
    if len(data_shape) != 3:
        raise ConfigError(f"--data {spec}: image files, but the teacher's samples are vectors")
    if not (path.is_dir() or path.suffix == ".zip"):
        raise ConfigError(f"--data {spec}: expected builtin:NAME, an image folder or a .zip")
    return _image_files(path, data_shape, label_dim)
