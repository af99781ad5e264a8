"""What disback may touch in a run directory, rule by rule (`store/layout.py`): the names it
owns, its temporary files, run names, link-free paths, what counts as foreign, and what cleanup
deletes (its own files only). The hostile corpus drives the same rules through the commands."""

from __future__ import annotations

import pytest

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.store.layout import (
    BACKTRACK,
    TRAJECTORY,
    backtrack_dir,
    check_no_links,
    check_run_name,
    checkpoint_file,
    foreign_entries,
    node_file,
    record_state_file,
    refuse_foreign,
    remove_empty_folders,
    remove_ours,
)


def test_the_names_disback_writes():
    assert node_file(3) == "nodes/node-003.safetensors"
    assert record_state_file(12) == "state/record-00000012.safetensors"
    assert checkpoint_file("ratio", 5) == "checkpoints/ratio-00000005.safetensors"
    assert TRAJECTORY.state_file(7) == "state/record-00000007.safetensors"
    assert BACKTRACK.state_file(7) == "checkpoints/state-00000007.safetensors"
    with pytest.raises(ValueError, match="no checkpoint file kind 'weights'"):
        checkpoint_file("weights", 1)


@pytest.mark.parametrize(
    ("layout", "name", "owned"),
    [
        (TRAJECTORY, "manifest.json", True),
        (TRAJECTORY, ".lock", True),
        (TRAJECTORY, "metrics.jsonl", False),
        (TRAJECTORY, "nodes/node-001.safetensors", True),
        (TRAJECTORY, "nodes/node-0001.safetensors", False),
        (TRAJECTORY, "nodes/node-001.safetensors.bak", False),
        (TRAJECTORY, "nodes/x/node-001.safetensors", False),
        (TRAJECTORY, "state/record-00000010.safetensors", True),
        (TRAJECTORY, "other/node-001.safetensors", False),
        (BACKTRACK, "metrics.jsonl", True),
        (BACKTRACK, "checkpoints/generator-ema-00000010.safetensors", True),
        (BACKTRACK, "checkpoints/ratio-00000010.safetensors", True),
        (BACKTRACK, "checkpoints/notes-00000010.safetensors", False),
        (BACKTRACK, "nodes/node-001.safetensors", False),
    ],
)
def test_what_a_layout_owns(layout, name, owned):
    assert layout.owns(name) is owned


@pytest.mark.parametrize(
    ("folder", "name", "owned"),
    [
        ("nodes", ".node-001.safetensors.ab12cd_9.tmp", True),
        ("", ".manifest.json.abcdefgh.tmp", True),
        ("nodes", ".node-001.safetensors.abc.tmp", False),  # not mkstemp's 8 characters
        ("nodes", ".notes.txt.abcdefgh.tmp", False),
        ("", ".notes.txt.abcdefgh.tmp", False),
        ("nodes", "node-001.safetensors.abcdefgh.tmp", False),
    ],
)
def test_temporary_files_are_owned_only_for_owned_names(folder, name, owned):
    assert TRAJECTORY.owns_temporary(folder, name) is owned


@pytest.mark.parametrize("name", ["default", "a", "lr-1e-4_seed.2", "x" * 100, "0"])
def test_plain_run_names_are_accepted(name, tmp_path):
    assert check_run_name(name) == name
    assert backtrack_dir(tmp_path, name) == tmp_path / "backtrack" / name


@pytest.mark.parametrize("name", ["", ".", "..", "-x", ".hidden", "a/b", "a b", "x" * 101])
def test_other_run_names_are_refused(name):
    with pytest.raises(ConfigError) as caught:
        check_run_name(name)
    assert str(caught.value) == (
        f"--name {name!r} is not a plain run name (letters, digits, '.', '_' and '-', starting "
        "with a letter or digit, at most 100 characters)"
    )


def test_paths_stay_below_the_run_without_links(tmp_path):
    (tmp_path / "nodes").mkdir()
    assert check_no_links(tmp_path, "nodes/a.safetensors") == tmp_path / "nodes/a.safetensors"
    for bad in ("../x", "nodes/../../x", "/etc/passwd"):
        with pytest.raises(DisbackError) as caught:
            check_no_links(tmp_path, bad)
        assert str(caught.value) == f"{tmp_path}: refusing the path {bad!r} (leaves the directory)"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DisbackError) as caught:
        check_no_links(tmp_path, "linked/a.safetensors")
    assert str(caught.value) == (
        f"{tmp_path / 'linked'}: is a symbolic link; disback does not follow links inside a run "
        "directory"
    )


def run_folder(root):
    (root / "nodes").mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    (root / ".lock").write_text("")
    (root / "nodes" / "node-001.safetensors").write_bytes(b"1")
    (root / "nodes" / ".node-002.safetensors.abcdefgh.tmp").write_bytes(b"2")
    (root / ".manifest.json.abcdefgh.tmp").write_text("{")
    return root


def test_a_folder_of_disbacks_own_files_holds_nothing_foreign(tmp_path):
    root = run_folder(tmp_path / "t")
    assert foreign_entries(root, TRAJECTORY, whole=True) == []
    refuse_foreign(root, TRAJECTORY, whole=True)


def test_foreign_entries_are_named(tmp_path):
    root = run_folder(tmp_path / "t")
    (root / "notes.txt").write_text("mine")
    (root / "plots").mkdir()
    (root / "link").symlink_to(tmp_path)
    (root / "nodes" / "sub").mkdir()
    (root / "nodes" / "readme.md").write_text("mine")
    (root / "nodes" / "node-009.safetensors").symlink_to(root / "notes.txt")
    (root / "state").write_text("a file where a folder belongs")
    whole = foreign_entries(root, TRAJECTORY, whole=True)
    assert whole == [  # each once, "state" too (a file where a folder belongs)
        "link",
        "notes.txt",
        "plots/",
        "nodes/node-009.safetensors",
        "nodes/readme.md",
        "nodes/sub/",
        "state",
    ]
    assert foreign_entries(root, TRAJECTORY, whole=False) == whole[3:]


def test_a_refusal_says_where_and_names_at_most_five(tmp_path):
    root = run_folder(tmp_path / "t")
    for i in range(7):
        (root / "nodes" / f"n{i}.txt").write_text("")
    with pytest.raises(DisbackError) as caught:
        refuse_foreign(root, TRAJECTORY, whole=False)
    assert str(caught.value) == (
        f"{root} has sub-folders holding files disback did not write (nodes/n0.txt, "
        "nodes/n1.txt, nodes/n2.txt, nodes/n3.txt, nodes/n4.txt and 2 more); move them away or "
        "choose another directory for the trajectory"
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "x").write_text("")
    with pytest.raises(DisbackError, match=f"^{run} holds files disback did not write \\(x\\); "):
        refuse_foreign(run, BACKTRACK, whole=True)


@pytest.mark.parametrize("name", ["manifest.json", "metrics.jsonl"])
def test_a_manifest_or_log_that_is_a_link_or_a_folder_is_refused(tmp_path, name):
    root = tmp_path / "run"
    root.mkdir()
    (root / name).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DisbackError) as caught:
        refuse_foreign(root, BACKTRACK, whole=False)
    assert str(caught.value) == (
        f"{root / name}: is a symbolic link; disback does not follow links inside a run directory"
    )
    (root / name).unlink()
    (root / name).mkdir()
    with pytest.raises(DisbackError, match=f"{name}: not a regular file"):
        refuse_foreign(root, BACKTRACK, whole=False)


def test_cleanup_deletes_only_disbacks_own_files_and_keeps_what_it_is_told(tmp_path):
    root = run_folder(tmp_path / "t")
    (root / "nodes" / "node-002.safetensors").write_bytes(b"2")
    (root / "nodes" / "readme.md").write_text("mine")
    (root / "notes.txt").write_text("mine")
    (root / "nodes" / "node-009.safetensors").symlink_to(root / "notes.txt")
    gone = remove_ours(root, TRAJECTORY, keep={"nodes/node-002.safetensors"})
    assert sorted(p.relative_to(root).as_posix() for p in gone) == [
        ".manifest.json.abcdefgh.tmp",
        "manifest.json",
        "nodes/.node-002.safetensors.abcdefgh.tmp",
        "nodes/node-001.safetensors",
    ]
    left = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    assert left == [
        ".lock",
        "nodes",
        "nodes/node-002.safetensors",
        "nodes/node-009.safetensors",
        "nodes/readme.md",
        "notes.txt",
    ]
    assert (root / "notes.txt").read_text() == "mine"  # the link's target too
    assert remove_ours(tmp_path / "missing", TRAJECTORY) == []


def test_only_empty_owned_folders_are_removed(tmp_path):
    root = tmp_path / "t"
    (root / "nodes").mkdir(parents=True)
    (root / "state").mkdir()
    (root / "state" / "mine.txt").write_text("")
    (root / "plots").mkdir()
    remove_empty_folders(root, TRAJECTORY)
    assert sorted(p.name for p in root.iterdir()) == ["plots", "state"]
    outside = tmp_path / "empty"
    outside.mkdir()
    (root / "nodes").symlink_to(outside)
    remove_empty_folders(root, TRAJECTORY)
    assert outside.is_dir() and (root / "nodes").is_symlink()


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_folder_that_is_a_link_or_a_file_does_not_hide_the_next_folder(tmp_path, kind):
    root = tmp_path / "t"
    root.mkdir()
    if kind == "link":
        (tmp_path / "elsewhere").mkdir()
        (root / "nodes").symlink_to(tmp_path / "elsewhere")
    else:
        (root / "nodes").write_text("")
    (root / "state").mkdir()
    (root / "state" / "notes.txt").write_text("")
    assert foreign_entries(root, TRAJECTORY, whole=False) == ["nodes", "state/notes.txt"]
    assert foreign_entries(root, TRAJECTORY, whole=True) == ["nodes", "state/notes.txt"]


def test_exactly_five_foreign_entries_are_all_named_without_a_count(tmp_path):
    root = run_folder(tmp_path / "t")
    for i in range(5):
        (root / "nodes" / f"n{i}.txt").write_text("")
    with pytest.raises(DisbackError) as caught:
        refuse_foreign(root, TRAJECTORY, whole=False)
    assert "nodes/n4.txt); move them away" in str(caught.value)
