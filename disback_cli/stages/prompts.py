"""The training prompts of a text-to-image run: read, checked, encoded by the teacher's text
encoders, and recorded in the run's manifest."""

from __future__ import annotations

from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.models.teachers import Teacher
from disback_cli.models.text_to_image.text import PromptSource, TextEncoder, read_prompts
from disback_cli.store.manifests import PromptsRef


def with_training_prompts(
    teacher: Teacher, path: str, device, expected_sha256: str | None = None
) -> tuple[Teacher, PromptsRef]:
    """The teacher conditioned on the prompts of `path` (drawn per training batch), and the
    reference a manifest keeps of them. `expected_sha256`: the file a trajectory recorded."""
    prompts, digest = read_prompts(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise DisbackError(
            f"{path}: not the prompt file the trajectory was recorded with (sha256 differs); "
            "pass --prompts FILE to train on other prompts"
        )
    source = PromptSource(TextEncoder(teacher.folder, device), prompts)
    ref = PromptsRef(file=str(Path(path).absolute()), sha256=digest, count=len(prompts))
    return teacher.with_prompts(source), ref
