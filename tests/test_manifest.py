import json

import pytest

from disback_cli.errors import DisbackError
from disback_cli.trajectory import SCHEMA_VERSION, TrajectoryManifest, read_manifest, write_manifest


def test_manifest_round_trip(small_trajectory, tmp_path):
    manifest = read_manifest(small_trajectory, TrajectoryManifest)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.status == "complete"
    assert [n.index for n in manifest.nodes] == [0, 1, 2, 3]
    assert manifest.nodes[0].file is None and manifest.nodes[0].sha256 == manifest.teacher.sha256
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path, TrajectoryManifest)
    assert again.model_dump(exclude={"updated_at"}) == manifest.model_dump(exclude={"updated_at"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema_version": SCHEMA_VERSION + 1}, "newer disback"),
        ({"schema_version": "one"}, "unknown schema_version"),
        ({"schema_version": 0}, "unknown schema_version"),
        ({"kind": "disback.backtrack"}, "expected a disback.trajectory manifest"),
        ({"nodes": "all of them"}, "invalid configuration: nodes"),
    ],
)
def test_bad_manifests_are_refused_with_one_line(small_trajectory, tmp_path, change, message):
    raw = json.loads((small_trajectory / "manifest.json").read_text())
    raw.update(change)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DisbackError, match=message) as info:
        read_manifest(tmp_path, TrajectoryManifest)
    assert "\n" not in str(info.value)


def test_missing_and_garbage_manifests(tmp_path):
    with pytest.raises(DisbackError, match="not a disback run directory"):
        read_manifest(tmp_path, TrajectoryManifest)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DisbackError, match="unreadable manifest"):
        read_manifest(tmp_path, TrajectoryManifest)
