"""Feature detectors for image metrics.

`InceptionDetector` is clean-fid's TorchScript Inception-v3 (`inception-2015-12-05.pt`, the network
behind EDM's published FIDs), used through clean-fid's own resizer and wrapper. Only
`cleanfid.resize` and `cleanfid.inception_torchscript` are imported, so torchvision is not needed.
The weights are found locally (never silently fetched in tests) and checked by SHA-256.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from disback_cli.errors import DisbackError
from disback_cli.evaluation import FID_MODES
from disback_cli.store.fileio import hash_regular_file

INCEPTION_FILE = "inception-2015-12-05.pt"
MAX_DETECTOR_BYTES = 1 << 30  # the Inception network is 92 MB
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_URL = (
    f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
)


class Detector(Protocol):
    """Maps uint8 images (N, H, W, C) to feature vectors (N, D)."""

    def describe(self) -> dict: ...

    def features(self, images: np.ndarray) -> np.ndarray: ...


def cache_dir() -> Path:
    if "DISBACK_CACHE" in os.environ:
        return Path(os.environ["DISBACK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "disback"


def locate_inception(explicit: Path | None = None, download: bool = True) -> Path:
    """--inception PATH, else $DISBACK_INCEPTION, else the cache, else clean-fid's /tmp copy;
    download into the cache only if allowed (and not DISBACK_OFFLINE=1)."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise DisbackError(f"{explicit}: no such Inception weights file")
        return Path(explicit)
    candidates = [cache_dir() / INCEPTION_FILE, Path(tempfile.gettempdir()) / INCEPTION_FILE]
    if os.environ.get("DISBACK_INCEPTION"):
        candidates.insert(0, Path(os.environ["DISBACK_INCEPTION"]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    target = cache_dir() / INCEPTION_FILE
    if download and os.environ.get("DISBACK_OFFLINE") != "1":
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            with (
                urllib.request.urlopen(INCEPTION_URL, timeout=30) as response,
                open(partial, "wb") as f,
            ):
                shutil.copyfileobj(response, f)
            partial.replace(target)
            return target
        except OSError:
            pass
    raise DisbackError(
        f"Inception weights {INCEPTION_FILE} not found and not downloadable; put the file "
        f"(sha256 {INCEPTION_SHA256}) at {target}, or pass --inception PATH, "
        f"or set DISBACK_INCEPTION (source: {INCEPTION_URL})"
    )


class InceptionDetector:
    """clean-fid's Inception features: 'legacy_tensorflow' resizes inside the network (EDM's
    protocol), 'clean' resizes with PIL bicubic in float first."""

    def __init__(
        self,
        path: Path,
        mode: str = "legacy_tensorflow",
        device: torch.device | str = "cpu",
        expected_sha256: str | None = INCEPTION_SHA256,
        workers: int = 2,
    ) -> None:
        if mode not in FID_MODES:
            raise DisbackError(f"unknown FID mode {mode!r} (use {' or '.join(FID_MODES)})")
        digest = hash_regular_file(path, MAX_DETECTOR_BYTES, "detector weights file")
        if expected_sha256 is not None and digest != expected_sha256:
            raise DisbackError(
                f"{path}: sha256 {digest} is not that of {INCEPTION_FILE} "
                f"({expected_sha256}); the file is corrupt or another network"
            )
        try:
            from cleanfid.inception_torchscript import InceptionV3W
            from cleanfid.resize import build_resizer
        except ImportError:
            raise DisbackError(
                "clean-fid is not installed: "
                "pip install --no-deps clean-fid==0.1.35 && pip install pillow requests"
            ) from None
        self.path, self.mode, self.sha256, self.device = (
            Path(path),
            mode,
            digest,
            torch.device(device),
        )
        with tempfile.TemporaryDirectory() as folder:  # InceptionV3W wants a folder with that name
            os.symlink(self.path.resolve(), Path(folder) / INCEPTION_FILE)
            self.model = InceptionV3W(
                folder, download=False, resize_inside=mode == "legacy_tensorflow"
            )
        self.model = self.model.to(self.device).eval()
        self.resize = build_resizer(mode)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers))

    def describe(self) -> dict:
        return {
            "name": "inception-2015-12-05",
            "metric": "FID",
            "mode": self.mode,
            "sha256": self.sha256,
            "file": str(self.path),
        }

    def features(self, images: np.ndarray) -> np.ndarray:
        if images.shape[-1] == 1:  # greyscale, as EDM does: repeat to RGB
            images = np.repeat(images, 3, axis=-1)
        resized = list(self.pool.map(self.resize, images))
        batch = torch.from_numpy(np.stack(resized).astype(np.float32)).permute(0, 3, 1, 2)
        with torch.no_grad():
            return self.model(batch.to(self.device)).cpu().numpy()
