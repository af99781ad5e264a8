"""Image sets to evaluate: a PNG/JPEG folder (EDM layout or flat), an .npz of uint8 images, an EDM
dataset zip, or a generator sampled on the fly. Each yields uint8 (N, H, W, C) batches."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disback_cli.errors import DisbackError
from disback_cli.method.sampling import MAX_SAMPLES, one_step_batches
from disback_cli.models.conditioning import condition_source
from disback_cli.store.archives import open_zip, read_member
from disback_cli.store.fileio import read_regular_file
from disback_cli.store.images import to_uint8
from disback_cli.store.npzfile import read_npz
from disback_cli.store.samples import complete_images

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
MAX_IMAGE_BYTES = 256 << 20  # one image file
MAX_PIXELS = 1 << 26  # one image, decoded (a small file may declare a vast canvas)


def _decode(data: bytes, name: str) -> np.ndarray:
    """uint8 (H, W, C) pixels, C 1 or 3; the canvas is bounded before it is decoded, and 16-bit
    images keep their contrast (their high byte), where a plain conversion saturates them."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: the bound below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DisbackError(f"{name}: {width}x{height} pixels, more than an image may hold")
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
                array = (wide.astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
            else:
                array = np.asarray(image.convert("L" if image.mode in ("L", "1") else "RGB"))
    except DisbackError:
        raise
    except Exception as exc:
        raise DisbackError(f"{name}: not a readable image ({exc})") from None
    return array[:, :, None] if array.ndim == 2 else array


@dataclass
class ImageSet:
    """`count` images, read in index order by `read(start, stop)`."""

    description: str
    count: int
    read: Callable[[int, int], np.ndarray]

    def array(self) -> np.ndarray:
        """All the images at once (small sets: the built-in data sets' metrics)."""
        return np.concatenate(list(self.batches(1000)))

    def batches(self, batch: int, start: int = 0, stop: int | None = None) -> Iterator[np.ndarray]:
        stop = self.count if stop is None else stop
        for first in range(start, stop, batch):
            images = self.read(first, min(first + batch, stop))
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DisbackError(f"{self.description}: expected uint8 images (N, H, W, C)")
            yield images

    def shape(self) -> tuple[int, ...]:
        return tuple(self.read(0, 1).shape[1:])


def _stacked(items: list[np.ndarray], description: str) -> np.ndarray:
    if len({item.shape for item in items}) > 1:
        raise DisbackError(f"{description}: images have different sizes")
    return np.stack(items)


def folder_images(path: Path, any_images: bool = True) -> ImageSet:
    """The images of a folder: with `any_images` every image in it (a data set, another tool's
    samples), else exactly those its `disback sample` completion record lists."""
    if any_images:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in EXTENSIONS)
    else:
        files = complete_images(path, EXTENSIONS, MAX_SAMPLES)
    if not files:
        raise DisbackError(f"{path}: no images found (png, jpg, ...)")

    def read(start: int, stop: int) -> np.ndarray:
        chunk = files[start:stop]
        images = [_decode(read_regular_file(f, MAX_IMAGE_BYTES, "image"), str(f)) for f in chunk]
        return _stacked(images, str(path))

    return ImageSet(f"folder {path}", len(files), read)


def zip_images(path: Path) -> ImageSet:
    archive = open_zip(path, "dataset zip")
    names = sorted(n for n in archive.namelist() if Path(n).suffix.lower() in EXTENSIONS)
    if not names:
        raise DisbackError(f"{path}: no images in the zip")

    def read(start: int, stop: int) -> np.ndarray:
        images = [
            _decode(read_member(archive, n, MAX_IMAGE_BYTES, f"{path}:{n}"), f"{path}:{n}")
            for n in names[start:stop]
        ]
        return _stacked(images, str(path))

    return ImageSet(f"dataset zip {path}", len(names), read)


def npz_images(path: Path) -> ImageSet | None:
    """Images from `images` (ours) or `arr_0` (ADM style); None if the file holds vector samples."""
    arrays = read_npz(path)
    if "samples" in arrays and "images" not in arrays:
        return None
    key = "images" if "images" in arrays else "arr_0" if "arr_0" in arrays else None
    if key is None:
        raise DisbackError(f"{path}: no 'images' or 'arr_0' array in this .npz")
    images = arrays[key]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DisbackError(
            f"{path}: '{key}' must be uint8 images (N, H, W, C) with C 1 or 3, got "
            f"{images.dtype} {images.shape}"
        )
    return ImageSet(f"npz {path}", len(images), lambda a, b: images[a:b])


def generated_images(
    generator: torch.nn.Module,
    seeds: Sequence[int],
    batch: int,
    device: torch.device,
    description: str,
) -> ImageSet:
    """Images sampled on the fly, one random stream per seed (nothing written to disk)."""
    denoiser = generator.denoiser

    def read(start: int, stop: int) -> np.ndarray:
        chunks = one_step_batches(
            generator,
            seeds[start:stop],
            denoiser.data_shape,
            condition_source(denoiser.label_dim),
            batch,
            device,
        )
        return np.concatenate([to_uint8(x) for x, _ in chunks])

    return ImageSet(description, len(seeds), read)


def open_images(path: Path, any_images: bool = True) -> ImageSet | None:
    """The image set at `path` (at least 2 images), or None for an .npz of vector samples
    (`any_images`: see `folder_images`)."""
    if path.is_dir():
        images = folder_images(path, any_images)
    elif not path.exists():
        raise DisbackError(f"{path}: no such file or folder")
    elif path.suffix == ".zip":
        images = zip_images(path)
    elif path.suffix == ".npz":
        images = npz_images(path)
    else:
        raise DisbackError(f"{path}: expected an image folder, an .npz or a dataset .zip")
    if images is not None and images.count < 2:
        raise DisbackError(f"{path}: {images.count} images; evaluation needs at least 2")
    return images
