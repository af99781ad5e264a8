"""Opening a recorded trajectory for the stages that read it: its manifest, its teacher (checked
against the recorded sha256) and its path node files (checked up front)."""

from __future__ import annotations

from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.models.teachers import Teacher, open_teacher, teacher_location
from disback_cli.store.fileio import check_sha256, hash_regular_file
from disback_cli.store.layout import check_no_links
from disback_cli.store.manifests import TrajectoryManifest, read_manifest
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES


def open_trajectory(
    trajectory: Path, teacher_override: str | None, device, verify: bool = True
) -> tuple[TrajectoryManifest, Teacher]:
    """A completed trajectory and its teacher, verified by sha256 (node files too, up front, so
    a bad node stops the run before it writes anything rather than at its target switch)."""
    manifest, source = completed_trajectory(trajectory, teacher_override)
    teacher = open_teacher(source, device, manifest.teacher.sha256, recorded_in=trajectory)
    check_node_files(trajectory, manifest, verify)
    return manifest, teacher


def completed_trajectory(
    trajectory: Path, teacher_override: str | None
) -> tuple[TrajectoryManifest, str]:
    """A completed trajectory's manifest and where its teacher is (not read yet)."""
    manifest = read_manifest(trajectory, TrajectoryManifest)
    if manifest.status != "complete":
        step = manifest.state.step if manifest.state else 0
        raise DisbackError(
            f"{trajectory}: trajectory is still recording (iteration {step} of "
            f"{manifest.config.iters}); finish it with `disback record` first"
        )
    source = teacher_override or manifest.teacher.source
    if teacher_override is None and not teacher_location(source).exists():
        raise DisbackError(
            f"{trajectory}: its teacher {source} is not there any more; pass --teacher PATH "
            "(the file is checked against the recorded sha256)"
        )
    return manifest, source


def check_node_files(trajectory: Path, manifest: TrajectoryManifest, verify: bool) -> None:
    """Every path node file is there, no link, and (`verify`) has its recorded sha256."""
    for node in manifest.nodes:
        if node.file is None:
            continue
        path = check_no_links(trajectory, node.file)
        if not path.is_file():
            raise DisbackError(f"{path}: path node {node.index} named by the manifest is missing")
        if verify:
            check_sha256(
                path, hash_regular_file(path, MAX_SAFETENSORS_BYTES, "path node"), node.sha256
            )
