"""What disback may delete and replace: only files it wrote, never through a link. The refusals
are in the bad-input corpus; these are the cases where disback does act."""

from __future__ import annotations

import hashlib
import json
import shutil

from test_fid import images_like, write_folder

from disback_cli.stages.record import run_record
from disback_cli.store.fileio import atomic_write_bytes
from disback_cli.store.images import png_name
from disback_cli.store.layout import (
    BACKTRACK,
    TRAJECTORY,
    backtrack_dir,
    foreign_entries,
    remove_ours,
)
from disback_cli.store.samples import read_record


def files(root) -> dict[str, str]:
    """Every file under root with its sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


RUN = ["--iters", "20", "--batch", "32", "--save-every", "10", "--device", "cpu"]


def test_force_discards_only_the_files_of_its_own_run(small_trajectory, tmp_path, cli):
    trajectory = tmp_path / "t"
    shutil.copytree(small_trajectory, trajectory)
    (trajectory / "samples.npz").write_bytes(b"the user's samples")
    for name in ("a", "b"):
        assert cli("backtrack", "-T", trajectory, "--name", name, *RUN).code == 0
    (backtrack_dir(trajectory, "a") / "notes.txt").write_text("the user's notes")
    others = files(trajectory)
    others = {k: v for k, v in others.items() if not k.startswith("backtrack/a/checkpoints")}

    result = cli(
        "backtrack", "-T", trajectory, "--name", "a", *RUN[:2], "--batch", "16", *RUN[4:], "--force"
    )
    assert result.code == 0, result.stderr
    after = files(trajectory)
    for name, digest in others.items():  # run b, the nodes, the user's files: untouched
        if not name.startswith("backtrack/a/") or name == "backtrack/a/notes.txt":
            assert after[name] == digest, name
    manifest = json.loads((backtrack_dir(trajectory, "a") / "manifest.json").read_text())
    assert manifest["config"]["batch"] == 16


def test_record_force_keeps_the_users_files_beside_the_trajectory(small_trajectory, tmp_path, cli):
    out = tmp_path / "t"
    shutil.copytree(small_trajectory, out)
    (out / "samples.npz").write_bytes(b"the user's samples")
    result = cli(
        "record",
        "--teacher",
        "builtin:ring2d",
        "--out",
        out,
        "--iters",
        "40",
        "--nodes",
        "2",
        "--batch",
        "32",
        "--device",
        "cpu",
        "--force",
    )
    assert result.code == 0, result.stderr
    assert (out / "samples.npz").read_bytes() == b"the user's samples"
    assert sorted(p.name for p in (out / "nodes").iterdir()) == [
        "node-001.safetensors",
        "node-002.safetensors",
    ]
    assert not (out / "state").exists()  # only resume points were there


def test_cleanup_names_only_disbacks_own_files(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "checkpoints").mkdir()
    ours = [
        "nodes/node-004.safetensors",
        "nodes/.node-004.safetensors.ab12cd34.tmp",
        ".manifest.json.x1y2z3w4.tmp",
    ]
    theirs = [
        "nodes/node-4.safetensors",
        "nodes/node-004.safetensors.bak",
        "notes.txt",
        "nodes/.node-004.safetensors.tmp",
        "checkpoints/state-00000010.safetensors",
    ]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    assert sorted(foreign_entries(tmp_path, TRAJECTORY, whole=False)) == sorted(
        n for n in theirs if n.startswith("nodes/")
    )
    gone = remove_ours(tmp_path, TRAJECTORY)
    assert sorted(str(p.relative_to(tmp_path)) for p in gone) == sorted(ours)
    assert all((tmp_path / name).exists() for name in theirs)
    assert foreign_entries(tmp_path, BACKTRACK, whole=False) == []  # state-… is a checkpoint name


def test_atomic_writes_replace_a_link_not_its_target(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("someone else's")
    (tmp_path / "out.npz").symlink_to(target)
    atomic_write_bytes(tmp_path / "out.npz", b"ours")
    assert not (tmp_path / "out.npz").is_symlink()
    assert (tmp_path / "out.npz").read_bytes() == b"ours"
    assert target.read_text() == "someone else's"


def test_sample_replaces_exactly_its_own_earlier_images(small_trajectory, tmp_path, cli):
    digits = ["--teacher", "builtin:digits", "--steps", "2", "--device", "cpu"]
    out = tmp_path / "pngs"
    assert cli("sample", *digits, "-n", "5", "-o", out).code == 0
    record = read_record(out, 100)
    assert record["status"] == "complete" and record["seeds"] == [0, 1, 2, 3, 4]
    result = cli("sample", *digits, "--seeds", "3-4", "-o", out)
    assert result.code == 0 and "replaced 5 images" in " ".join(result.stderr.split())
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [png_name(3), png_name(4)]
    assert cli("evaluate", out, "--dataset", "digits", "--json").code == 0


def test_a_sample_killed_midway_is_refused_by_evaluate_and_replaced_by_sample(tmp_path, cli):
    digits = ["--teacher", "builtin:digits", "--steps", "2", "--device", "cpu"]
    out = tmp_path / "pngs"
    assert cli("sample", *digits, "-n", "4", "-o", out).code == 0
    record = json.loads((out / "provenance.json").read_text())
    (out / "provenance.json").write_text(json.dumps({**record, "status": "writing"}))
    (out / png_name(3)).unlink()  # the kill came before the last image
    result = cli("evaluate", out, "--dataset", "digits")
    assert result.code == 1 and "did not finish writing" in result.stderr
    assert cli("sample", *digits, "-n", "4", "-o", out).code == 0
    assert cli("evaluate", out, "--dataset", "digits").code == 0


def test_any_images_scores_a_folder_disback_did_not_write(tmp_path, cli):
    folder = write_folder(tmp_path / "real", images_like(6, 0, channels=1))
    assert cli("evaluate", folder, "--dataset", "digits").code == 1
    result = cli("evaluate", folder, "--dataset", "digits", "--any-images", "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "digits" and [r["n"] for r in report["results"]] == [6]


def test_a_resumed_recording_keeps_a_users_file_beside_it(small_trajectory, tmp_path):
    from disback_cli.config import RecordConfig

    out = tmp_path / "t"
    shutil.copytree(small_trajectory, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(status="recording", nodes=manifest["nodes"][:2])
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "README.txt").write_text("what this trajectory is")
    run_record(RecordConfig(**{**manifest["config"], "device": "cpu"}), out)
    assert (out / "README.txt").read_text() == "what this trajectory is"
    assert len(list((out / "nodes").iterdir())) == 3
