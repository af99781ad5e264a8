"""What a denoiser is conditioned on besides x and sigma.

Every denoiser is called as `D(x, sigma, **cond)`. `cond` is a `Conditioning`: keyword names mapped
to batch-first tensors, which the training loops, losses and samplers pass through without looking
inside (as k-diffusion passes `extra_args` through its wrappers). Our class-conditional networks
take `class_labels` (one-hot); a text-to-image adapter takes its text embeddings under its own
names, and classifier-free guidance its unconditional twin.

Where conditions come from is a `ConditionSource`: drawn for each training batch from the run's
random stream, or one per seed for sampling, so that sample i depends on seed i alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F


class Conditioning(Mapping[str, torch.Tensor]):
    """Keyword inputs of a denoiser, each a tensor whose first axis is the batch."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self._tensors = dict(tensors or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._tensors.items())
        return f"Conditioning({shapes})"

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """Every tensor through `fn` (e.g. a rank's slice of the global batch)."""
        return Conditioning({k: fn(v) for k, v in self._tensors.items()})

    def rows(self, index: slice) -> Conditioning:
        return self.map(lambda t: t[index])

    def to(self, device: torch.device | str) -> Conditioning:
        return self.map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        if not parts:
            return Conditioning()
        return Conditioning({k: torch.cat([p[k] for p in parts]) for k in parts[0]})


NO_CONDITIONS = Conditioning()


class ConditionSource(Protocol):
    """Draws the conditions of a denoiser's inputs."""

    def draw(self, n: int, rng: torch.Generator, device: torch.device) -> Conditioning:
        """Conditions of a training batch of `n`, from the run's random stream."""
        ...

    def of_seed(self, rng: torch.Generator) -> Conditioning:
        """Conditions of one sample, from its seed's stream (after its noise), on the CPU."""
        ...

    def labels(self, cond: Conditioning) -> np.ndarray | None:
        """What `sample` records per sample (class indices), or None."""
        ...


class Unconditional:
    """A denoiser without conditions."""

    def draw(self, n: int, rng: torch.Generator, device: torch.device) -> Conditioning:
        return NO_CONDITIONS

    def of_seed(self, rng: torch.Generator) -> Conditioning:
        return NO_CONDITIONS

    def labels(self, cond: Conditioning) -> np.ndarray | None:
        return None


class ClassLabels:
    """One-hot class labels, uniform over `label_dim` classes, or all `fixed` when given (the
    seed's stream still draws a class, so that other seeds' samples do not change)."""

    def __init__(self, label_dim: int, fixed: int | None = None) -> None:
        self.label_dim, self.fixed = label_dim, fixed

    def one_hot(self, classes: torch.Tensor) -> Conditioning:
        """The conditions of classes given by index."""
        return Conditioning({"class_labels": F.one_hot(classes, self.label_dim).float()})

    def draw(self, n: int, rng: torch.Generator, device: torch.device) -> Conditioning:
        return self.one_hot(torch.randint(self.label_dim, (n,), generator=rng, device=device))

    def of_seed(self, rng: torch.Generator) -> Conditioning:
        label = torch.randint(self.label_dim, (), generator=rng).item()
        return self.one_hot(torch.tensor([label if self.fixed is None else self.fixed]))

    def labels(self, cond: Conditioning) -> np.ndarray | None:
        return cond["class_labels"].argmax(dim=1).numpy()


def condition_source(label_dim: int, fixed_class: int | None = None) -> ConditionSource:
    """The conditions our networks take: class labels when they have classes."""
    return ClassLabels(label_dim, fixed_class) if label_dim else Unconditional()
