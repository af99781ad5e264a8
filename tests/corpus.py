"""The bad-input corpus: a small world of files, a case that spoils it, one CLI call, and checks.

Every case starts from a copy of the same world: a finished trajectory `t` with a backtrack run
`default`, vector samples `s.npz`, and `outside/`, files that belong to nobody's run (a victim for
paths that try to leave a run directory). The case's `prepare` spoils the world and returns the
command; the runner then checks one `error:` line, the exit code, no traceback, and that no file
anywhere in the world, `outside/` included, was created, changed or removed (symbolic links are
recorded as links, never followed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from disback_cli.config import BacktrackConfig, RecordConfig, SampleConfig
from disback_cli.models.teachers import builtin_path
from disback_cli.store.fileio import sha256_file
from disback_cli.store.tensorfile import encode_safetensors, read_safetensors

RING = builtin_path("ring2d")
T = Path("t")
RUN = T / "backtrack" / "default"
RECORD_AGAIN = [
    "record",
    "--teacher",
    "builtin:ring2d",
    "--out",
    "t",
    "--iters",
    "60",
    "--nodes",
    "3",
    "--batch",
    "64",
]  # the template's own recording
EXTEND = ["backtrack", "-T", "t", "--iters", "40", "--batch", "64", "--save-every", "10"]


def build_template(root: Path) -> Path:
    from disback_cli.stages.backtrack import run_backtrack
    from disback_cli.stages.record import run_record
    from disback_cli.stages.sample import write_samples

    run_record(
        RecordConfig(teacher="builtin:ring2d", iters=60, nodes=3, batch=64, device="cpu"),
        root / "t",
    )
    run_backtrack(
        BacktrackConfig(iters=20, batch=64, save_every=10, log_every=10, device="cpu"), root / "t"
    )
    manifest = json.loads((root / RUN / "manifest.json").read_text())
    write_samples(
        SampleConfig(n=50, device="cpu"),
        root / RUN / manifest["generator_ema"]["file"],
        root / "s.npz",
    )
    (root / "outside" / "dir").mkdir(parents=True)
    (root / "outside" / "victim.txt").write_text("someone else's file\n")
    (root / "outside" / "dir" / "a.txt").write_text("someone else's folder\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: directories, links (by target, not followed) and file hashes."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                seen[str(path.relative_to(root))] = "link -> " + os.readlink(path)
            elif path.is_dir():
                seen[str(path.relative_to(root))] = "dir"
            elif not path.is_file():  # a FIFO or device: never read
                seen[str(path.relative_to(root))] = "special"
            else:
                seen[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


class World:
    """The case's working directory (`w / "t"` is a path in it), plus what a case may patch or
    start, undone after the case."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.monkeypatch, self.processes = root, monkeypatch, []

    def __truediv__(self, other) -> Path:
        return self.root / other


@dataclass
class Case:
    id: str
    prepare: Callable[[World], list[str]]
    message: str
    code: int = 1


def run_case(case: Case, template: Path, tmp_path: Path, monkeypatch, cli) -> None:
    shutil.copytree(template, tmp_path / "w", symlinks=True)
    monkeypatch.chdir(tmp_path / "w")
    world = World(tmp_path / "w", monkeypatch)
    try:
        args = case.prepare(world)
        before = snapshot(world.root)
        result = cli(*args)
        after = snapshot(world.root)
    finally:
        for process in world.processes:
            process.kill()
            process.wait()
    assert result.code == case.code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert case.message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert after == before


def check_ids(cases: list[Case]) -> None:
    assert len({c.id for c in cases}) == len(cases), "case ids must be unique"


# What cases use to spoil the world.


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_in(path: Path, keys: list, value) -> None:
    """manifest[keys[0]][keys[1]]... = value"""

    def change(data):
        target = data
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    edit_json(path, change)


def write_and(path: Path, data: bytes | str, args: list[str]) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return args


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def teacher_file(path: Path, metadata: dict[str, str], tensors=None) -> str:
    import torch

    tensors = tensors or {"w": torch.zeros(3)}
    path.write_bytes(encode_safetensors(tensors, metadata))
    return str(path)


def ring_metadata(**override: str) -> dict[str, str]:
    _, metadata, _ = read_safetensors(RING)
    return {**metadata, **override}


def ring_tensors():
    tensors, _, _ = read_safetensors(RING)
    return tensors


def rewrite_denoiser(path: Path, tensors=None, **metadata: str) -> None:
    """A denoiser file with changed tensors or metadata (no sha256 kept anywhere is updated)."""
    old_tensors, old_metadata, _ = read_safetensors(path)
    path.write_bytes(encode_safetensors(tensors or old_tensors, {**old_metadata, **metadata}))


def rehash(manifest_path: Path, keys: list, file: Path) -> None:
    """Make the manifest vouch for `file` as it is now: a hostile run shared with its hashes."""
    set_in(manifest_path, keys, sha256_file(file))


def generator_file(w: World, kind: str = "generator-ema") -> Path:
    manifest = json.loads((w / RUN / "manifest.json").read_text())
    key = "generator_ema" if kind == "generator-ema" else kind
    return w / RUN / manifest[key]["file"]
