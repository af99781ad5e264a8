"""One rule per file kind (issue #27): every file a backtrack manifest names is confined by the
one list `store.layout.CHECKPOINT_FILES`, and the hostile cases below are generated from that
list, so a new kind of file cannot land without its case: a shared run whose manifest names a
file outside (or another checkpoint's) is refused in one line, and nothing anywhere changes."""

from __future__ import annotations

import typing

import pytest
from corpus import EXTEND, RUN, Case, World, edit_json, run_case

from disback_cli.store.fileio import sha256_file
from disback_cli.store.layout import CHECKPOINT_FILES
from disback_cli.store.manifests import BacktrackManifest, FileRef


def file_fields(model: type) -> set[str]:
    """The fields of a manifest model that name a file (a `FileRef`, or a subclass)."""
    found = set()
    for name, field in model.model_fields.items():
        kinds = typing.get_args(field.annotation) or (field.annotation,)
        if any(isinstance(k, type) and issubclass(k, FileRef) for k in kinds):
            found.add(name)
    return found


def test_every_file_a_backtrack_manifest_names_has_its_rule():
    assert file_fields(BacktrackManifest) == set(CHECKPOINT_FILES)


WHERE = {
    "outside the run": "../../../outside/victim.txt",
    "absolute": "/etc/hostname",
    "another step": "checkpoints/{kind}-00000010.safetensors",
    "another kind": "checkpoints/state-00000020.safetensors",
}


def naming(field: str, where: str):
    def prepare(w: World) -> list[str]:
        kind = CHECKPOINT_FILES[field]
        target = WHERE[where].format(kind=kind)
        if target == f"checkpoints/{kind}-00000020.safetensors":  # its own name: use another
            target = "checkpoints/generator-00000020.safetensors"
        victim = w / "outside" / "victim.txt"

        def change(manifest: dict) -> None:
            ref = dict(manifest.get(field) or manifest["generator"])
            ref.update(file=target, sha256=sha256_file(victim))
            manifest[field] = ref

        edit_json(w / RUN / "manifest.json", change)
        return EXTEND

    return prepare


CASES = [
    Case(f"{field} {where}", naming(field, where), "manifest.json")
    for field in CHECKPOINT_FILES
    for where in WHERE
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_manifest_naming_a_foreign_file_is_refused(case, template, tmp_path, monkeypatch, cli):
    run_case(case, template, tmp_path, monkeypatch, cli)
