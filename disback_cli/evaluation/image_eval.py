"""FID-style evaluation of image sets against reference statistics, EDM's protocol by default.

References are EDM's `.npz` (`mu`, `sigma`) or ours, written by `disback evaluate ref`, which also
records the detector, mode, image count and size and keeps a subset of features for KID and
precision/recall. `repeats` evaluates disjoint parts (or seed sets) and reports min and mean, as EDM
reports the minimum of three.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from disback_cli import __version__
from disback_cli.errors import DisbackError
from disback_cli.evaluation.detectors import Detector
from disback_cli.evaluation.image_io import ImageSet
from disback_cli.evaluation.image_metrics import (
    feature_stats,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from disback_cli.evaluation.reports import make_report
from disback_cli.runtime.parallel import Execution
from disback_cli.runtime.reporting import Reporter, SilentReporter
from disback_cli.store.fileio import atomic_write_bytes, hash_regular_file
from disback_cli.store.npzfile import MAX_NPZ_BYTES, read_meta, read_npz

REFERENCE_FEATURES = 10_000  # features kept in a reference for KID and precision/recall
KID_SUBSETS, KID_SUBSET_SIZE, PR_K, PR_MAX = 100, 1000, 3, 10_000
SUBSET_SEED = 0


@dataclass
class Reference:
    path: Path
    sha256: str
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    meta: dict  # detector, n, image_shape, source; empty for EDM's files

    def describe(self) -> dict:
        return {
            "file": str(self.path),
            "sha256": self.sha256,
            "n": self.meta.get("n"),
            "detector": self.meta.get("detector"),
            "image_shape": self.meta.get("image_shape"),
            "has_features": self.features is not None,
        }


def extract_features(
    images: ImageSet,
    detector: Detector,
    batch: int,
    reporter: Reporter,
    start: int = 0,
    stop: int | None = None,
    label: str = "features",
    ex: Execution | None = None,
) -> np.ndarray | None:
    """Detector features of images start..stop in order. Under torchrun the batches go
    round-robin to the ranks and rank 0 receives them all; other ranks get None."""
    ex = ex or Execution(torch.device("cpu"))
    stop = images.count if stop is None else stop
    firsts = list(range(start, stop, batch))
    reporter.start(label, stop - start, 0)
    mine, done = {}, 0
    for index in range(ex.rank, len(firsts), ex.world_size):
        first = firsts[index]
        (chunk,) = images.batches(batch, first, min(first + batch, stop))
        mine[index] = detector.features(chunk)
        done += len(chunk)
        reporter.advance(min(stop - start, done * ex.world_size))
    gathered = ex.gather_to_main(mine)
    if gathered is None:
        return None
    merged = {index: features for part in gathered for index, features in part.items()}
    return np.concatenate([merged[index] for index in range(len(firsts))])


def _subset(features: np.ndarray, limit: int) -> np.ndarray:
    if len(features) <= limit:
        return features
    keep = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(features), limit, replace=False))
    return features[keep]


def write_reference(
    images: ImageSet,
    detector: Detector,
    out: Path,
    batch: int = 64,
    limit: int | None = None,
    reporter: Reporter | None = None,
    ex: Execution | None = None,
) -> dict | None:
    """Statistics of (the first `limit` of) `images`: mu, sigma and up to 10k features (written
    by rank 0 under torchrun; None on the other ranks)."""
    reporter = reporter or SilentReporter()
    stop = images.count if limit is None else min(limit, images.count)
    features = extract_features(images, detector, batch, reporter, 0, stop, "reference", ex)
    if features is None:  # not rank 0: it writes the file
        return None
    mu, sigma = feature_stats(features)
    meta = {
        "detector": detector.describe(),
        "n": int(stop),
        "image_shape": list(images.shape()),
        "source": images.description,
        "disback_version": __version__,
    }
    buffer = io.BytesIO()
    kept = _subset(features, REFERENCE_FEATURES).astype(np.float32)
    np.savez(buffer, mu=mu, sigma=sigma, features=kept, meta=np.asarray(json.dumps(meta)))
    return {"out": str(out), "sha256": atomic_write_bytes(out, buffer.getvalue()), **meta}


def load_reference(path: Path) -> Reference:
    """A reference .npz: `mu` and `sigma` of the detector's features (finite, matching shapes),
    optionally `features` and our `meta`."""
    if not path.exists():
        raise DisbackError(f"{path}: no such reference file")
    arrays = read_npz(path, "reference .npz")
    if "mu" not in arrays or "sigma" not in arrays:
        raise DisbackError(f"{path}: a reference needs 'mu' and 'sigma' arrays")
    try:
        mu, sigma = (np.asarray(arrays[k], np.float64) for k in ("mu", "sigma"))
        features = arrays.get("features")
        if features is not None and features.dtype.kind not in "iuf":
            raise TypeError(f"features are {features.dtype}")
    except (TypeError, ValueError) as exc:
        raise DisbackError(f"{path}: reference arrays are not numbers ({exc})") from None
    if mu.ndim != 1 or not len(mu) or sigma.shape != (len(mu), len(mu)):
        raise DisbackError(
            f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit (expected (D,), (D, D))"
        )
    if features is not None and (features.ndim != 2 or features.shape[1] != len(mu)):
        raise DisbackError(f"{path}: features {features.shape} do not fit mu {mu.shape}")
    if not all(
        np.isfinite(a).all() for a in (mu, sigma, *([] if features is None else [features]))
    ):
        raise DisbackError(f"{path}: the reference holds NaN or infinite values")
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-8 * np.abs(sigma).max()):
        raise DisbackError(f"{path}: sigma is not symmetric (not a covariance matrix)")
    digest = hash_regular_file(path, MAX_NPZ_BYTES, "reference")
    return Reference(path, digest, mu, sigma, features, read_meta(arrays, path))


def check_compatible(reference: Reference, detector: Detector, image_shape: tuple) -> None:
    """Refuse comparisons that would silently be wrong: another detector, mode or image size."""
    ours = detector.describe()
    theirs = reference.meta.get("detector")
    if theirs and (
        theirs.get("sha256") != ours["sha256"] or theirs.get("mode") != ours.get("mode")
    ):
        raise DisbackError(
            f"{reference.path} was computed with detector {theirs.get('name')} "
            f"mode {theirs.get('mode')} (sha256 {str(theirs.get('sha256'))[:12]}...), not "
            f"{ours['name']} mode {ours.get('mode')} ({ours['sha256'][:12]}...)"
        )
    shape = reference.meta.get("image_shape")
    if shape and tuple(shape)[:2] != tuple(image_shape)[:2]:
        raise DisbackError(
            f"images are {image_shape[0]}x{image_shape[1]} but {reference.path} was computed "
            f"on {shape[0]}x{shape[1]} images"
        )
    if len(reference.mu) != ours.get("feature_dim", len(reference.mu)):
        raise DisbackError(
            f"{reference.path}: {len(reference.mu)}-d statistics do not fit the detector"
        )


def score(features: np.ndarray, reference: Reference, metric_key: str) -> dict:
    mu, sigma = feature_stats(features)
    result = {
        "n": len(features),
        metric_key: frechet_distance(mu, sigma, reference.mu, reference.sigma),
    }
    if reference.features is not None:
        ref = reference.features.astype(np.float64)
        result["kid"] = kernel_inception_distance(
            features, ref, KID_SUBSETS, KID_SUBSET_SIZE, SUBSET_SEED
        )
        result["precision"], result["recall"] = precision_recall(
            _subset(ref, PR_MAX), _subset(features, PR_MAX), PR_K
        )
    else:
        result.update(kid=None, precision=None, recall=None)
    return result


def evaluate_images(
    parts: list[tuple[ImageSet, int, int, dict]],
    detector: Detector,
    reference: Reference,
    batch: int = 64,
    reporter: Reporter | None = None,
    ex: Execution | None = None,
) -> dict | None:
    """Score each (images, start, stop, provenance) part; report each and min/mean (on rank 0
    under torchrun, None on the other ranks, which extract their share of the features)."""
    reporter = reporter or SilentReporter()
    described = detector.describe()
    metric = described["metric"]
    key = metric.lower().replace("-", "_")
    check_compatible(reference, detector, parts[0][0].shape())
    results = []
    for i, (images, start, stop, provenance) in enumerate(parts):
        features = extract_features(
            images, detector, batch, reporter, start, stop, f"repeat {i + 1}", ex
        )
        if features is None:
            continue
        results.append({**score(features, reference, key), **provenance})
    if not results:
        return None
    settings = {
        "kid_subsets": KID_SUBSETS,
        "kid_subset_size": KID_SUBSET_SIZE,
        "pr_k": PR_K,
        "pr_max_samples": PR_MAX,
        "subset_seed": SUBSET_SEED,
    }
    return make_report(
        "image",
        metric,
        key,
        results,
        dataset=None,
        reference=reference.describe(),
        samples={},
        detector=described,
        settings=settings,
    )
