"""Images out: EDM's uint8 conversion, PNG files in EDM's folder layout, and sample grids.

PNG is written with zlib alone (8-bit greyscale or RGB, no interlace), so no imaging library is
needed at run time. Captions (grid labels, prompts) are drawn by matplotlib, the optional `plot`
extra, in a margin added beside the images; without it pictures are written uncaptioned.
"""

from __future__ import annotations

import math
import struct
import textwrap
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


def grid_columns(n: int) -> int:
    """How many images a row of `grid` holds by default (a square, or nearly)."""
    return math.ceil(math.sqrt(n))


def grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, C) images row by row into one image, with a 1-pixel grey border."""
    n, height, width, channels = images.shape
    columns = columns or grid_columns(n)
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (height + 1) + 1, columns * (width + 1) + 1, channels), 128, np.uint8)
    for i, image in enumerate(images):
        top, left = 1 + (i // columns) * (height + 1), 1 + (i % columns) * (width + 1)
        canvas[top : top + height, left : left + width] = image
    return canvas


def _text_strip(
    shape: tuple[int, int, int], texts: list[tuple[float, float, str, str]], font_px: int
) -> np.ndarray | None:
    """A white (height, width, channels) strip with `texts` in black: (x, y, text, alignment),
    in pixels, y the text's middle. None without matplotlib (captions are optional)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    height, width, channels = shape
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    for x, y, text, alignment in texts:
        figure.text(
            x / width,
            1 - y / height,
            text,
            ha=alignment,
            va="center",
            fontsize=font_px * 72 / dpi,
            color="black",
            parse_math=False,  # a prompt's "$" is text
        )
    canvas.draw()
    drawn = np.asarray(canvas.buffer_rgba())[:height, :width, :3]
    strip = np.full((height, width, 3), 255, np.uint8)  # in case the canvas came out a pixel short
    strip[: drawn.shape[0], : drawn.shape[1]] = drawn
    return np.ascontiguousarray(strip[..., :1] if channels == 1 else strip)


def caption_above(
    image: np.ndarray, spans: list[tuple[int, int, str]], font_px: int | None = None
) -> np.ndarray:
    """`image` under a white margin holding each label centred over its columns [left, right);
    the image's own pixels are unchanged. Without matplotlib, `image` as it is."""
    font_px = font_px or max(12, min(48, image.shape[0] // 30))
    margin = 2 * font_px
    texts = [((left + right) / 2, margin / 2, label, "center") for left, right, label in spans]
    strip = _text_strip((margin, image.shape[1], image.shape[2]), texts, font_px)
    return image if strip is None else np.concatenate([strip, image], axis=0)


def caption_rows(
    image: np.ndarray, rows: list[tuple[int, int, list[str]]], font_px: int
) -> np.ndarray:
    """`image` right of a white margin holding each row's caption lines (top, bottom, lines),
    shortened to fit the margin and the row's height; the image's own pixels are unchanged.
    Without matplotlib, `image` as it is."""
    width = max(160, image.shape[1] // 3)
    characters = max(8, int((width - font_px) / (0.6 * font_px)))  # DejaVu Sans, roughly
    texts = []
    for top, bottom, lines in rows:
        room = max(1, int((bottom - top) / (1.25 * font_px)))
        if len(lines) == 1:  # one caption: wrapped over the row's height
            shown = textwrap.wrap(" ".join(lines[0].split()), characters) or [""]
            if len(shown) > room:
                shown = [*shown[: room - 1], shorten(" ".join(shown[room - 1 :]), characters)]
        else:  # one line each; the last line says what did not fit
            shown = [shorten(line, characters) for line in lines]
            if len(shown) > room:
                shown = [*shown[: room - 1], f"(+{len(shown) - room + 1} more)"]
        texts.append((font_px / 2, (top + bottom) / 2, "\n".join(shown), "left"))
    strip = _text_strip((image.shape[0], width, image.shape[2]), texts, font_px)
    return image if strip is None else np.concatenate([strip, image], axis=1)


def shorten(text: str, characters: int) -> str:
    """`text` on one line, cut to `characters` with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= characters else text[: characters - 1].rstrip() + "…"


def prompt_grid(images: np.ndarray, prompts: list[str] | None = None) -> np.ndarray:
    """The grid `sample --grid` writes: `images` tiled and enlarged to 512 pixels a side; with
    each image's prompt (text-to-image samples), every row captioned on its left with its
    prompts, and the columns of each where a row holds several."""
    tiles = grid(images)
    tiled = upscale(tiles)
    if not prompts:
        return tiled
    n, height = len(images), images.shape[1]
    columns, factor = grid_columns(n), tiled.shape[0] // tiles.shape[0]
    rows = []
    for start in range(0, n, columns):
        top = (1 + start // columns * (height + 1)) * factor
        runs: list[list] = []  # [first column, last column, prompt] of each prompt in the row
        for column, prompt in enumerate(prompts[start : min(start + columns, n)], start=1):
            if runs and runs[-1][2] == prompt:
                runs[-1][1] = column
            else:
                runs.append([column, column, prompt])
        lines = (
            [p for _, _, p in runs]
            if len(runs) == 1
            else [f"{a}-{b}: {p}" if a != b else f"{a}: {p}" for a, b, p in runs]
        )
        rows.append((top, top + height * factor, lines))
    return caption_rows(tiled, rows, max(10, min(40, height * factor // 6)))
