"""FD-digits: an offline image metric for the built-in 8x8 digits.

A small classifier (conv 32, conv 64, pool, fc 64, fc 10; 85k parameters) is trained on the
train split; its 64-d penultimate features give a Fréchet distance ("FD-digits", never called FID)
against the train split's statistics, and its predictions give class coverage. The shipped weights
(`builtin/digits-features.safetensors`) are reproduced by

    python -m disback_cli.evaluation.digits --out disback_cli/builtin/digits-features.safetensors
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.evaluation.datasets import digits_uint8
from disback_cli.evaluation.image_metrics import feature_stats, frechet_distance
from disback_cli.store.fileio import atomic_write_chunks
from disback_cli.store.tensorfile import load_weights, read_safetensors, safetensors_chunks

FORMAT = "disback.detector"
COVERAGE_SHARE = 0.03  # a class counts as covered with at least 3 % of the samples


class DigitsClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv2(F.silu(self.conv1(x))))
        return F.silu(self.fc1(F.avg_pool2d(x, 2).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 8, 8, 1) -> float (N, 1, 8, 8) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _augment(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (zero fill) and light noise."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=rng))
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    x = padded[:, :, 1 + dy : 9 + dy, 1 + dx : 9 + dx]
    return x + 0.1 * torch.randn(x.shape, generator=rng)


def train_classifier(seed: int = 0, epochs: int = 30, batch: int = 64) -> tuple[nn.Module, float]:
    """Train on the train split; return the model and its held-out accuracy."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    images, labels = digits_uint8("train")
    x, y = to_input(images), torch.from_numpy(labels)
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=rng)
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(model(_augment(x[index], rng)), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    held_images, held_labels = digits_uint8("heldout")
    with torch.no_grad():
        predicted = model.eval()(to_input(held_images)).argmax(1).numpy()
    return model, float((predicted == held_labels).mean())


def builtin_detector_path() -> Path:
    return Path(str(resources.files("disback_cli") / "builtin" / "digits-features.safetensors"))


class DigitsDetector:
    """Features and class predictions of the shipped digit classifier."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or builtin_detector_path()
        tensors, metadata, self.sha256 = read_safetensors(path)
        if metadata.get("format") != FORMAT:
            raise DisbackError(f"{path}: not a disback detector file")
        self.model = DigitsClassifier()
        load_weights(self.model, tensors, str(path))
        self.model.eval().requires_grad_(False)
        self.path = path
        self._reference: tuple[np.ndarray, np.ndarray] | None = None

    def describe(self) -> dict:
        return {
            "name": "digits-cnn",
            "metric": "FD-digits",
            "mode": None,
            "sha256": self.sha256,
            "feature_dim": 64,
            "file": str(self.path),
        }

    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Feature mean and covariance of the train split, computed once per detector."""
        if self._reference is None:
            self._reference = feature_stats(self.features(digits_uint8("train")[0]))
        return self._reference

    def _check(self, images: np.ndarray) -> None:
        if images.shape[1:] != (8, 8, 1):
            raise DisbackError(
                f"the digits metric needs 8x8 greyscale images, got {images.shape[1:]}"
            )

    def features(self, images: np.ndarray) -> np.ndarray:
        self._check(images)
        with torch.no_grad():
            return self.model.features(to_input(images)).double().numpy()

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        self._check(images)
        with torch.no_grad():
            return self.model(to_input(images)).softmax(1).double().numpy()


def digits_scores(images: np.ndarray, detector: DigitsDetector) -> dict:
    """FD-digits against the train split, class coverage and classifier confidence."""
    mu_ref, sigma_ref = detector.reference_stats()
    mu, sigma = feature_stats(detector.features(images))
    probs = detector.probabilities(images)
    shares = np.bincount(probs.argmax(1), minlength=10) / len(images)
    return {
        "n": len(images),
        "fd_digits": frechet_distance(mu, sigma, mu_ref, sigma_ref),
        "classes_covered": int((shares >= COVERAGE_SHARE).sum()),
        "classes_total": len(shares),
        "max_class_share": float(shares.max()),
        "confidence": float(probs.max(1).mean()),
    }


def heldout_floor(detector: DigitsDetector, n: int) -> dict:
    """The same scores for real held-out digits (at most 797): what real data gets at this n."""
    images, _ = digits_uint8("heldout")
    return digits_scores(images[:n], detector)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the FD-digits feature network.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, accuracy = train_classifier(args.seed)
    train = {"seed": args.seed, "epochs": 30, "heldout_accuracy": accuracy}
    metadata = {"format": FORMAT, "name": "digits-cnn", "train": json.dumps(train)}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    digest = atomic_write_chunks(args.out, *safetensors_chunks(tensors, metadata))
    print(f"wrote {args.out} (sha256 {digest}); held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
