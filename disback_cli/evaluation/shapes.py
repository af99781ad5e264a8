"""Built-in shapes: 16x16 colour images of one shape, drawn procedurally from known factors.

Each image is one of 4 shapes (square, disc, triangle, cross) in one of 4 colours at one of 4
positions (the quadrants' centres) on a dark background: 64 modes, each a small continuous
cluster (sub-pixel offset, size and brightness jitter, anti-aliased edges). The class label is
shape x colour (16 classes, 4 positions each). Because every mode has a clean template, a
generated image is assigned to its mode exactly and mode coverage is counted, not estimated; and a
teacher trained on 20 000 such images is imperfect away from them, which is where DisBack's
premise lives.
"""

from __future__ import annotations

import functools

import torch

SIZE = 16
SHAPES = ("square", "disc", "triangle", "cross")
COLOURS = {  # RGB in [-1, 1]
    "red": (0.9, -0.7, -0.7),
    "green": (-0.7, 0.8, -0.6),
    "blue": (-0.6, -0.5, 0.9),
    "yellow": (0.9, 0.8, -0.7),
}
POSITIONS = ((4.5, 4.5), (4.5, 11.5), (11.5, 4.5), (11.5, 11.5))  # (row, column) centres
BACKGROUND = -0.8
RADIUS = 3.0  # half-width of a shape, in pixels
SUPERSAMPLE = 4
TRAIN_IMAGES = 20_000
HELD_OUT = 5_000
SEED = 20260101  # the training split; the held-out split uses SEED + 1


def _coverage(shape: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, r: torch.Tensor):
    """Inside-masks of every shape at offsets (dy, dx) from the centre, half-width r."""
    ay, ax = dy.abs(), dx.abs()
    square = (ay <= r) & (ax <= r)
    disc = dy**2 + dx**2 <= r**2
    triangle = (dy <= r) & (dy >= -r) & (ax <= (dy + r) / 2)  # apex up
    cross = ((ay <= r / 3) & (ax <= r)) | ((ax <= r / 3) & (ay <= r))
    masks = torch.stack([square, disc, triangle, cross])  # (4, N, H, W)
    return masks.gather(0, shape.view(1, -1, 1, 1).expand(1, *dy.shape)).squeeze(0)


def render(
    shape: torch.Tensor,
    colour: torch.Tensor,
    position: torch.Tensor,
    offset: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    brightness: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images (N, 3, 16, 16) in [-1, 1] of the given factor indices and jitters."""
    n = len(shape)
    offset = torch.zeros(n, 2) if offset is None else offset
    scale = torch.ones(n) if scale is None else scale
    brightness = torch.ones(n) if brightness is None else brightness
    fine = SIZE * SUPERSAMPLE
    grid = (torch.arange(fine, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # pixel coordinates
    centre = torch.tensor(POSITIONS)[position] + offset  # (N, 2)
    dy = grid.view(1, fine, 1) - centre[:, 0].view(n, 1, 1)
    dx = grid.view(1, 1, fine) - centre[:, 1].view(n, 1, 1)
    r = (RADIUS * scale).view(n, 1, 1)
    mask = _coverage(shape, dy.expand(n, fine, fine), dx.expand(n, fine, fine), r).float()
    cover = torch.nn.functional.avg_pool2d(mask.unsqueeze(1), SUPERSAMPLE)  # (N, 1, 16, 16)
    rgb = torch.tensor(list(COLOURS.values()))[colour] * brightness.view(n, 1)  # (N, 3)
    return BACKGROUND + cover * (rgb.view(n, 3, 1, 1) - BACKGROUND)


def factors(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Uniform shape, colour and position indices and the jitters, from `generator`."""
    shape = torch.randint(4, (n,), generator=generator)
    colour = torch.randint(4, (n,), generator=generator)
    position = torch.randint(4, (n,), generator=generator)
    offset = (torch.rand(n, 2, generator=generator) - 0.5) * 1.5  # +-0.75 px
    scale = 0.85 + 0.3 * torch.rand(n, generator=generator)
    brightness = 0.85 + 0.15 * torch.rand(n, generator=generator)
    return shape, colour, position, offset, scale, brightness


def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels (shape * 4 + colour) of the 'train' (20 000) or 'heldout' (5 000)
    split, drawn from fixed seeds."""
    if name not in ("train", "heldout"):
        raise ValueError(f"no shapes split {name!r}")
    n, seed = (TRAIN_IMAGES, SEED) if name == "train" else (HELD_OUT, SEED + 1)
    shape, colour, position, *jitter = factors(n, torch.Generator().manual_seed(seed))
    return render(shape, colour, position, *jitter), shape * 4 + colour


# --- the metric: each image assigned to its mode by the nearest of 9600 rendered variants ------

MODES = 64
COVERAGE_SHARE = 0.2  # a mode is covered with at least 20 % of its fair share of the samples
PRECISE_QUANTILE = 0.999  # of real held-out images' distances: a sample nearer is "precise"


@functools.lru_cache(maxsize=1)
def variant_bank() -> tuple[torch.Tensor, torch.Tensor]:
    """Every mode rendered at a grid of its jitters (5 x 5 offsets, 3 sizes, 2 brightnesses):
    (9600, 768) flattened images and their mode index shape * 16 + colour * 4 + position. The
    nearest variant names a real image's mode exactly (all 5 000 held-out images agree with
    their labels)."""
    offsets = torch.linspace(-0.75, 0.75, 5)
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    offset = torch.stack([oy.flatten(), ox.flatten()], 1)
    scale, brightness = torch.tensor([0.9, 1.0, 1.1]), torch.tensor([0.88, 0.97])
    grid = torch.meshgrid(
        torch.arange(MODES), torch.arange(25), torch.arange(3), torch.arange(2), indexing="ij"
    )
    mode, o, s, b = (g.flatten() for g in grid)
    images = render(mode // 16, (mode // 4) % 4, mode % 4, offset[o], scale[s], brightness[b])
    return images.flatten(1), mode


def nearest_mode(images: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode index and distance to the nearest variant of (N, 3, 16, 16) images in [-1, 1]."""
    bank, mode = variant_bank()
    distances, modes = [], []
    for start in range(0, len(images), chunk):
        flat = images[start : start + chunk].flatten(1).float()
        best, index = torch.cdist(flat, bank).min(dim=1)
        distances.append(best)
        modes.append(mode[index])
    return torch.cat(modes), torch.cat(distances)


@functools.lru_cache(maxsize=1)
def precise_distance() -> float:
    """The distance within which a sample counts as precise: the 99.9th percentile of the
    held-out real images' distances to their nearest variant."""
    images, _ = split("heldout")
    return float(nearest_mode(images)[1].quantile(PRECISE_QUANTILE))


def shapes_scores(images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Mode statistics of (N, 3, 16, 16) samples in [-1, 1]: mean distance to the nearest
    mode variant (lower is better; real images score about 1.1), precision (share within the
    real data's 99.9th percentile), modes covered of 64 and their balance (total variation from
    uniform over the precise samples), and with `labels` the share of precise samples whose
    shape and colour are the class they were drawn for."""
    if images.shape[1:] != (3, SIZE, SIZE) or len(images) < 2:
        raise ValueError(
            f"shapes scores need at least 2 images of 3x16x16, got {tuple(images.shape)}"
        )
    mode, distance = nearest_mode(images)
    precise = distance <= precise_distance()
    counts = torch.bincount(mode[precise], minlength=MODES).double()
    shares = counts / counts.sum().clamp(min=1)
    scores = {
        "n": len(images),
        "template_distance": float(distance.mean()),
        "precision": float(precise.double().mean()),
        "modes_covered": int((shares >= COVERAGE_SHARE / MODES).sum()),
        "modes_total": MODES,
        "mode_tv": float(0.5 * (shares - 1 / MODES).abs().sum()),
    }
    if labels is not None:
        right = (mode // 4 == labels.to(mode.device)) & precise
        scores["label_accuracy"] = float(right.double().sum() / precise.sum().clamp(min=1))
    return scores


def heldout_floor(n: int) -> dict:
    """The same scores for n real held-out images (at most 5000)."""
    images, labels = split("heldout")
    return shapes_scores(images[:n], labels[:n])
