"""Images out: EDM's uint8 conversion, PNG files in EDM's folder layout, and sample grids.

PNG is written with zlib alone (8-bit greyscale or RGB, no interlace), so no imaging library is
needed at run time.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] -> (N, H, W, C) uint8 via x * 127.5 + 128, clipped (EDM)."""
    x = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, C) uint8 image with C = 1 (grey) or 3 (RGB)."""
    height, width, channels = image.shape
    if channels not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(
            f"PNG needs uint8 images with 1 or 3 channels, got {image.dtype} x {channels}"
        )
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    colour_type = 0 if channels == 1 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def png_name(seed: int) -> str:
    """EDM dataset layout: 1000 images per folder, `00000/img00000000.png`."""
    return f"{seed:08d}"[:5] + f"/img{seed:08d}.png"


def upscale(image: np.ndarray, min_side: int = 512) -> np.ndarray:
    """Enlarge by the smallest whole factor that makes the shorter side at least `min_side`
    (nearest neighbour: every pixel stays a crisp square)."""
    factor = max(1, math.ceil(min_side / min(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, C) images row by row into one image, with a 1-pixel grey border."""
    n, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), 128, np.uint8)
    for i, image in enumerate(images):
        top, left = 1 + (i // columns) * (height + 1), 1 + (i % columns) * (width + 1)
        canvas[top : top + height, left : left + width] = image
    return canvas
