"""A trained generator in forms other tools load (`disback export`).

Which formats a generator can take is its family's answer (`TeacherFamily.exporters`): every
family writes a disback safetensors file; denoiser-file families also write an ONNX graph, and
text-to-image families a diffusers UNet or pipeline folder. An exporter checks the options first
(nothing is written on a refusal), then writes its files through an `ExportFolder` and says how
to use them (`Usage`), which goes into the model card every export carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from disback_cli.config.export import ExportConfig
from disback_cli.method.generator import OneStepGenerator
from disback_cli.models.networks import NetworkSpec
from disback_cli.runtime.reporting import Reporter
from disback_cli.store.export_folder import ExportFolder
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ExportSource:
    """A finished backtrack run's generator (float32, eval mode, on the CPU) and its run."""

    generator: OneStepGenerator
    spec: NetworkSpec
    info: dict[str, Any]  # the generator file's provenance, with its "file" and "sha256"
    trajectory: Path
    run_dir: Path
    run: BacktrackManifest
    recording: TrajectoryManifest
    model_folder: str | None = None  # a text-to-image teacher's folder, if it moved


@dataclass
class Usage:
    """What the model card says about an export: how to run it, and facts of the format."""

    snippet: str  # Python that loads the export and draws images (or vectors) from it
    facts: dict[str, Any] = field(default_factory=dict)  # e.g. the opset, the scheduler


class Exporter(Protocol):
    description: str  # one line, for the card

    def check(self, cfg: ExportConfig, source: ExportSource) -> None:
        """Refuse options this format cannot honour, before anything is written."""

    def write(
        self, cfg: ExportConfig, source: ExportSource, folder: ExportFolder, reporter: Reporter
    ) -> Usage:
        """Write the export's files into `folder`; say how to use them."""
