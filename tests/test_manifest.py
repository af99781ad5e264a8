import json
import math

import pytest

from disback_cli.errors import DisbackError
from disback_cli.store.manifests import (
    SCHEMA_VERSION,
    TrajectoryManifest,
    read_manifest,
    write_manifest,
)


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


def edge_values(model, which: str) -> dict:
    """Every bounded number of a config model at its smallest or largest allowed value (the
    bounds read from the model's JSON schema, so a new field is covered without editing here)."""
    values = {}
    for name, prop in model.model_json_schema()["properties"].items():
        for option in prop.get("anyOf", [prop]):
            kind = option.get("type")
            if kind not in ("integer", "number"):
                continue
            inclusive, exclusive = (
                ("minimum", "exclusiveMinimum")
                if which == "low"
                else ("maximum", "exclusiveMaximum")
            )
            if inclusive in option:
                values[name] = option[inclusive]
            elif exclusive in option:
                bound = option[exclusive]
                direction = math.inf if which == "low" else -math.inf
                values[name] = (
                    bound + (1 if which == "low" else -1)
                    if kind == "integer"
                    else math.nextafter(bound, direction)
                )
    return values


@pytest.mark.parametrize("which", ["low", "high"])
def test_every_config_value_at_its_bounds_round_trips_through_a_manifest(
    small_trajectory, tmp_path, which
):
    """A manifest disback writes is always one it can read again, whatever the flags were."""
    from disback_cli.config import BacktrackConfig, RecordConfig
    from disback_cli.store.manifests import BacktrackManifest

    trajectory = read_manifest(small_trajectory, TrajectoryManifest)
    record = edge_values(RecordConfig, which)
    backtrack = edge_values(BacktrackConfig, which)
    assert {"lr", "sigma_init", "batch", "nodes", "p_std"} <= set(record)
    assert {"lr_g", "grad_clip", "ema_halflife_kimg", "sid_alpha", "eval_samples"} <= set(backtrack)
    trajectory.config = RecordConfig(teacher="builtin:ring2d", **record)
    trajectory.status, trajectory.nodes, trajectory.node_plan = (
        "recording",
        trajectory.nodes[:1],
        None,
    )
    trajectory.elapsed_seconds = 1e12 if which == "high" else 0.0
    write_manifest(tmp_path, trajectory)
    assert read_manifest(tmp_path, TrajectoryManifest).config == trajectory.config

    run = BacktrackManifest(
        created_at="x",
        updated_at="x",
        status="running",
        name="a" * 100,
        teacher=trajectory.teacher,
        g0=trajectory.g0,
        path_sha256=["0" * 64, "1" * 64],
        step=0,
        world_size=1 << 20,
        global_batch=1 << 40,
        config=BacktrackConfig(optimizer="adamw", **backtrack),
    )
    write_manifest(tmp_path / "run", run)
    assert read_manifest(tmp_path / "run", BacktrackManifest).config == run.config


def test_a_manifest_that_would_not_read_back_is_not_written(small_trajectory, tmp_path):
    manifest = read_manifest(small_trajectory, TrajectoryManifest)
    manifest.nodes[1].dist_to_teacher = math.inf  # e.g. a probe that overflowed
    with pytest.raises(DisbackError, match="it would not read back"):
        write_manifest(tmp_path, manifest)
    assert not (tmp_path / "manifest.json").exists()
