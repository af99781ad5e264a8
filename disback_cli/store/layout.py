"""What disback may touch in a run directory: the names it writes, confinement of the paths a
manifest gives, no symbolic links, and cleanup limited to files it wrote.

Run directories travel between people (a lab shares a trajectory), so everything read from one is
treated as hostile. A path in a manifest must be one of the names below, in its sub-folder; no
component below the run directory may be a symbolic link; files are deleted only if their names are
names disback generates, in the folders it writes them to; a new run refuses a directory holding
anything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from disback_cli.errors import ConfigError, DisbackError

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
EVALUATIONS = "evaluations.jsonl"  # `disback evaluate`'s reports on the run's generators
LOCK = ".lock"
BACKTRACK_FOLDER = "backtrack"

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp's random part
SHOWN = 5  # foreign entries named in a refusal


@dataclass(frozen=True)
class Layout:
    """The files disback writes in one kind of run directory."""

    kind: str  # shown in messages
    root_files: frozenset[str]  # names directly in the run directory
    folders: dict[str, re.Pattern]  # sub-folder -> the names disback writes in it
    state_file: Callable[[int], str]  # name of the resume point at a step
    bundles: dict[str, re.Pattern] = field(default_factory=dict)  # sub-folder -> the folders
    # disback writes in it (sharded resume points)
    sharded_state_file: Callable[[int], str] | None = None  # name of a sharded resume point

    def owns(self, relative: str) -> bool:
        """Whether `relative` (e.g. 'nodes/node-001.safetensors') is a name disback writes."""
        parts = PurePosixPath(relative).parts
        if len(parts) == 1:
            return parts[0] in self.root_files
        pattern = self.folders.get(parts[0])
        if len(parts) == 3:
            return self.owns_bundle(parts[0], parts[1]) and (
                BUNDLE_FILES.fullmatch(parts[2]) is not None
                or _temporary_of(parts[2], BUNDLE_FILES)
            )
        return len(parts) == 2 and pattern is not None and pattern.fullmatch(parts[1]) is not None

    def owns_bundle(self, folder: str, name: str) -> bool:
        """A sharded resume point's folder, or the temporary one it is written under."""
        pattern = self.bundles.get(folder)
        if pattern is None:
            return False
        return pattern.fullmatch(name) is not None or _temporary_of(name, pattern)

    def owns_temporary(self, folder: str, name: str) -> bool:
        """A temporary file of an atomic write of one of our names (a killed process left it)."""
        match = TEMPORARY.fullmatch(name)
        if match is None:
            return False
        inner = match["name"] if not folder else f"{folder}/{match['name']}"
        return self.owns(inner)


def _temporary_of(name: str, pattern: re.Pattern) -> bool:
    match = TEMPORARY.fullmatch(name)
    return match is not None and pattern.fullmatch(match["name"]) is not None


# What a sharded resume point's folder holds: the shard files torch.distributed.checkpoint writes
# (one per process, Hugging Face safetensors layout) and the loop state.
BUNDLE_FILES = re.compile(r"shard-\d{5}-model-\d{5}-of-\d{5}\.safetensors|extra\.json")


def node_file(index: int) -> str:
    return f"nodes/node-{index:03d}.safetensors"


def record_state_file(step: int, sharded: bool = False) -> str:
    return f"state/record-{step:08d}" + (".dcp" if sharded else ".safetensors")


# Every file a backtrack manifest names, by its field, and the kind of checkpoint file it is: the
# one rule of what such a field may name (`checkpoint_file`), and the only names the run's
# cleanup may delete. A new kind of file is one entry here (the hostile cases follow from it).
CHECKPOINT_FILES = {
    "generator": "generator",
    "generator_ema": "generator-ema",
    "ratio": "ratio",  # diffratio's density-ratio network (the verifier)
    "head": "head",  # --adversary dmd2: the discriminator's classifier head
    "state": "state",
}


def checkpoint_file(kind: str, step: int, sharded: bool = False) -> str:
    """The file of a checkpoint kind (a value of `CHECKPOINT_FILES`) at `step`; a sharded run's
    state is a folder of shards (`store.sharded_state`)."""
    if kind not in CHECKPOINT_FILES.values():
        raise ValueError(f"no checkpoint file kind {kind!r}")
    if sharded and kind == "state":
        return f"checkpoints/state-{step:08d}.dcp"
    return f"checkpoints/{kind}-{step:08d}.safetensors"


TRAJECTORY = Layout(
    "trajectory",
    frozenset({MANIFEST, LOCK}),
    {
        "nodes": re.compile(r"node-\d{3}\.safetensors"),
        "state": re.compile(r"record-\d{8}\.safetensors"),
    },
    record_state_file,
    bundles={"state": re.compile(r"record-\d{8}\.dcp")},
    sharded_state_file=lambda step: record_state_file(step, sharded=True),
)
BACKTRACK = Layout(
    "backtrack run",
    frozenset({MANIFEST, METRICS, EVALUATIONS, LOCK}),
    {"checkpoints": re.compile(rf"({'|'.join(CHECKPOINT_FILES.values())})-\d{{8}}\.safetensors")},
    lambda step: checkpoint_file("state", step),
    bundles={"checkpoints": re.compile(r"state-\d{8}\.dcp")},
    sharded_state_file=lambda step: checkpoint_file("state", step, sharded=True),
)


def check_run_name(name: str) -> str:
    """A backtrack run name is one plain folder name: no separators, no '..', no hidden names."""
    if not RUN_NAME.fullmatch(name):  # its first character is a letter or digit: no . or ..
        raise ConfigError(
            f"--name {name!r} is not a plain run name (letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 100 characters)"
        )
    return name


def backtrack_dir(trajectory: str | Path, name: str) -> Path:
    return Path(trajectory) / BACKTRACK_FOLDER / check_run_name(name)


def check_no_links(root: Path, relative: str | Path) -> Path:
    """`root / relative` after checking that no component below `root` is a symbolic link (so
    nothing is read, written or deleted through a link planted in a shared run directory)."""
    path = Path(root)
    for part in PurePosixPath(relative).parts:
        if part in ("..", "/") or not part:
            raise DisbackError(
                f"{root}: refusing the path {str(relative)!r} (leaves the directory)"
            )
        path = path / part
        if path.is_symlink():
            raise DisbackError(
                f"{path}: is a symbolic link; disback does not follow links inside a run directory"
            )
    return path


def _describe(entries: list[str]) -> str:
    shown = ", ".join(entries[:SHOWN])
    return shown + (f" and {len(entries) - SHOWN} more" if len(entries) > SHOWN else "")


def foreign_entries(root: Path, layout: Layout, whole: bool) -> list[str]:
    """Entries that disback did not write: in the owned sub-folders, and with `whole` also
    directly in `root` (a new run needs a directory of its own)."""
    foreign: list[str] = []
    if whole and root.is_dir():
        for entry in sorted(root.iterdir()):
            name = entry.name
            if name in layout.folders:  # checked below, whatever it is
                continue
            if entry.is_symlink():
                foreign.append(name)
            elif not (name in layout.root_files and entry.is_file()) and not (
                entry.is_file() and layout.owns_temporary("", name)
            ):
                foreign.append(name + ("/" if entry.is_dir() else ""))
    for folder in layout.folders:
        path = root / folder
        if path.is_symlink():
            foreign.append(folder)
            continue
        if not path.is_dir():
            if path.exists():
                foreign.append(folder)
            continue
        for entry in sorted(path.iterdir()):
            if entry.is_dir() and not entry.is_symlink() and layout.owns_bundle(folder, entry.name):
                foreign += _foreign_in_bundle(entry, f"{folder}/{entry.name}", layout)
                continue
            ours = layout.owns(f"{folder}/{entry.name}") or layout.owns_temporary(
                folder, entry.name
            )
            if entry.is_symlink() or not entry.is_file() or not ours:
                foreign.append(f"{folder}/{entry.name}" + ("/" if entry.is_dir() else ""))
    return foreign


def _foreign_in_bundle(path: Path, relative: str, layout: Layout) -> list[str]:
    return [
        f"{relative}/{entry.name}" + ("/" if entry.is_dir() else "")
        for entry in sorted(path.iterdir())
        if entry.is_symlink() or not entry.is_file() or not layout.owns(f"{relative}/{entry.name}")
    ]


def refuse_foreign(root: Path, layout: Layout, whole: bool) -> None:
    """Refuse, naming them, files in `root` that disback did not write (it never mixes its files
    with others, and never deletes them)."""
    for name in (MANIFEST, METRICS):
        if (root / name).is_symlink():
            raise DisbackError(
                f"{root / name}: is a symbolic link; disback does not follow links inside a run "
                "directory"
            )
        if (root / name).exists() and not (root / name).is_file():
            raise DisbackError(f"{root / name}: not a regular file")
    foreign = foreign_entries(root, layout, whole)
    if foreign:
        where = "holds" if whole else "has sub-folders holding"
        raise DisbackError(
            f"{root} {where} files disback did not write ({_describe(foreign)}); "
            f"move them away or choose another directory for the {layout.kind}"
        )


def remove_ours(root: Path, layout: Layout, keep: set[str] = frozenset()) -> list[Path]:
    """Delete the files disback writes in `root` except those in `keep` (relative names), and the
    temporary files of its atomic writes; call `refuse_foreign` first. Returns what went."""
    gone: list[Path] = []
    candidates = [("", entry) for entry in sorted(root.iterdir())] if root.is_dir() else []
    for folder in layout.folders:
        path = root / folder
        if path.is_dir() and not path.is_symlink():
            candidates += [(folder, entry) for entry in sorted(path.iterdir())]
    for folder, entry in candidates:
        relative = f"{folder}/{entry.name}" if folder else entry.name
        if relative in keep or relative == LOCK or entry.is_symlink():
            continue
        if entry.is_dir() and layout.owns_bundle(folder, entry.name):
            gone += remove_bundle(root, relative, layout)
        elif entry.is_file() and (
            layout.owns(relative) or layout.owns_temporary(folder, entry.name)
        ):
            entry.unlink()
            gone.append(entry)
    return gone


def remove_file_or_bundle(root: Path, relative: str, layout: Layout) -> None:
    """Delete a file a manifest named (a sharded resume point is a folder of files)."""
    folder, _, name = relative.partition("/")
    if layout.owns_bundle(folder, name):
        remove_bundle(root, relative, layout)
    else:
        (root / relative).unlink(missing_ok=True)


def remove_bundle(root: Path, relative: str, layout: Layout) -> list[Path]:
    """Delete a sharded resume point's folder: the files disback writes in it, then the folder
    if that left it empty (anything else in it stays, and so does the folder)."""
    path = root / relative
    if path.is_symlink() or not path.is_dir():
        return []
    gone = []
    for entry in sorted(path.iterdir()):
        if not entry.is_symlink() and entry.is_file() and layout.owns(f"{relative}/{entry.name}"):
            entry.unlink()
            gone.append(entry)
    if not any(path.iterdir()):
        path.rmdir()
        gone.append(path)
    return gone


def remove_empty_folders(root: Path, layout: Layout) -> None:
    """Remove owned sub-folders that are left empty (never a folder with anything in it)."""
    for folder in layout.folders:
        path = root / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
