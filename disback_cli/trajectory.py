"""The on-disk trajectory directory and its versioned manifests.

    runs/t1/
      manifest.json                 TrajectoryManifest: teacher, G0, config, path nodes, status
      nodes/node-001.safetensors    path node i (node 0 is the teacher, referenced, not copied)
      state/record-*.safetensors    resume state while recording
      backtrack/<name>/
        manifest.json               BacktrackManifest: config, step, latest files, status
        metrics.jsonl               one JSON object per logged iteration
        checkpoints/                generator(-ema)-<step>.safetensors, state-<step>.safetensors

Manifests are written last, after every file they name, and name each file with its sha256.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from disback_cli import __version__
from disback_cli.config import BacktrackConfig, RecordConfig, describe_validation_error
from disback_cli.errors import DisbackError
from disback_cli.fileio import atomic_write_bytes, remove_temporaries
from disback_cli.networks import NetworkSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRef(_Record):
    file: str  # relative to the directory holding the manifest
    sha256: str


class StateRef(FileRef):
    step: int


class NodeRecord(_Record):
    index: int  # 0 = teacher ... N = fitted to G0
    step: int  # recording iteration at which it was saved
    file: str | None  # None for node 0: the teacher itself
    sha256: str
    dist_to_teacher: float  # mean |D_node - D_teacher| on a fixed probe of noised G0 samples


class TeacherRef(_Record):
    source: str
    sha256: str
    network: NetworkSpec
    dataset: str | None


class G0Spec(_Record):
    """The initial generator G0(z) = D(sigma_init z, sigma_init) and where D comes from."""

    kind: Literal["teacher_copy", "file", "random"] = "teacher_copy"
    sigma_init: float
    file: str | None = None  # kind "file": a disback denoiser file ...
    sha256: str | None = None  # ... with this hash
    network: NetworkSpec | None = None  # kind "random": this network ...
    init_seed: int | None = None  # ... initialised from this seed


class _Manifest(_Record):
    schema_version: int = SCHEMA_VERSION
    disback_version: str = __version__
    created_at: str
    updated_at: str


class TrajectoryManifest(_Manifest):
    kind: Literal["disback.trajectory"] = "disback.trajectory"
    status: Literal["recording", "complete"]
    teacher: TeacherRef
    generator_init: G0Spec
    config: RecordConfig
    nodes: list[NodeRecord]
    state: StateRef | None = None
    node_plan: list[int] | None = None  # recording steps of nodes 1..N (placement by distance)
    elapsed_seconds: float = 0.0
    world_size: int = 1  # data-parallel processes; --batch is per process
    global_batch: int | None = None  # batch x world_size

    @property
    def last_node(self) -> int:
        return self.nodes[-1].index


class BacktrackManifest(_Manifest):
    kind: Literal["disback.backtrack"] = "disback.backtrack"
    status: Literal["running", "complete"]
    name: str
    teacher: TeacherRef
    generator_init: G0Spec
    path_sha256: list[str]  # sha256 of nodes 0..N this run was trained on
    config: BacktrackConfig
    step: int = 0
    generator: FileRef | None = None
    generator_ema: FileRef | None = None
    state: StateRef | None = None
    metrics: str = "metrics.jsonl"
    elapsed_seconds: float = 0.0
    world_size: int = 1  # data-parallel processes; --batch is per process
    global_batch: int | None = None  # batch x world_size


ManifestT = TypeVar("ManifestT", TrajectoryManifest, BacktrackManifest)


def read_manifest(directory: str | Path, model: type[ManifestT]) -> ManifestT:
    """Read and validate `directory/manifest.json`, refusing other kinds and newer schemas."""
    path = Path(directory) / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DisbackError(
            f"{directory}: no {MANIFEST} here (not a disback run directory)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DisbackError(f"{path}: unreadable manifest ({exc})") from None
    expected_kind = model.model_fields["kind"].default
    if not isinstance(raw, dict) or raw.get("kind") != expected_kind:
        found = raw.get("kind") if isinstance(raw, dict) else type(raw).__name__
        raise DisbackError(f"{path}: expected a {expected_kind} manifest, found {found!r}")
    version = raw.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise DisbackError(f"{path}: unknown schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise DisbackError(
            f"{path}: schema_version {version} was written by a newer disback "
            f"(this one reads up to {SCHEMA_VERSION}); upgrade disback"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise DisbackError(f"{path}: {describe_validation_error(exc)}") from None


def write_manifest(directory: str | Path, manifest: _Manifest) -> None:
    manifest.updated_at = now()
    text = manifest.model_dump_json(indent=2) + "\n"
    atomic_write_bytes(Path(directory) / MANIFEST, text.encode())


def remove_unlisted(directory: Path, subdirs: tuple[str, ...], keep: set[str]) -> list[Path]:
    """Delete files in `subdirs` that the manifest does not name (a killed run wrote them after
    its last manifest update) and temporary files anywhere under `directory`."""
    gone = remove_temporaries(directory)
    for subdir in subdirs:
        folder = directory / subdir
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.is_file() and f"{subdir}/{path.name}" not in keep:
                path.unlink()
                gone.append(path)
    return gone


def backtrack_dir(trajectory: str | Path, name: str) -> Path:
    return Path(trajectory) / "backtrack" / name
