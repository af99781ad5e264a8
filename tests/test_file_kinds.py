"""One rule per file kind (issue #27): every file a backtrack manifest names is confined by the
one list `store.layout.CHECKPOINT_FILES`, and the hostile cases below are generated from that
list, so a new kind of file cannot land without its case: a shared run whose manifest names a
file outside (or another checkpoint's) is refused in one line, and nothing anywhere changes. The
same cases are generated for a trajectory's path nodes and resume point."""

from __future__ import annotations

import typing

import pytest
from corpus import EXTEND, RECORD_AGAIN, RUN, Case, T, World, edit_json, run_case

from disback_cli.store.fileio import sha256_file
from disback_cli.store.layout import CHECKPOINT_FILES
from disback_cli.store.manifests import BacktrackManifest, FileRef, NodeRecord, TrajectoryManifest


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


# The trajectory: its files are path nodes and the recording's resume point, and the manifest
# model pins each name to its index or step, so every foreign name is refused when it is read.
TRAJECTORY_WHERE = {
    **{k: v for k, v in WHERE.items() if k in ("outside the run", "absolute")},
    "another node": "nodes/node-002.safetensors",
    "the resume point": "state/record-00000020.safetensors",
}


def test_a_trajectory_manifest_names_files_only_through_nodes_and_its_resume_point():
    assert file_fields(TrajectoryManifest) == {"state"}
    assert NodeRecord.model_fields["file"].annotation == str | None


def naming_in_trajectory(what: str, where: str):
    def prepare(w: World) -> list[str]:
        victim = w / "outside" / "victim.txt"
        target = WHERE.get(where) or TRAJECTORY_WHERE[where]

        def change(manifest: dict) -> None:
            if what == "state":  # a recording in progress, resumed by recording again
                manifest.update(status="recording", nodes=manifest["nodes"][:2])
                manifest["state"] = {"file": target, "sha256": sha256_file(victim), "step": 20}
            else:
                node = manifest["nodes"][int(what)]
                node.update(file=target, sha256=sha256_file(victim))

        edit_json(w / T / "manifest.json", change)
        return RECORD_AGAIN if what == "state" else EXTEND

    return prepare


TRAJECTORY_CASES = [
    Case(f"trajectory {what} {where}", naming_in_trajectory(what, where), "must be")
    for what in ("1", "3", "state")
    for where in TRAJECTORY_WHERE
    if not (what == "state" and where == "the resume point")  # its own name
]


@pytest.mark.parametrize("case", TRAJECTORY_CASES, ids=[c.id for c in TRAJECTORY_CASES])
def test_a_trajectory_naming_a_foreign_file_is_refused(case, template, tmp_path, monkeypatch, cli):
    run_case(case, template, tmp_path, monkeypatch, cli)
