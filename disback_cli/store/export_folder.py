"""An export folder: files `disback export` writes for other tools, and the record of which files
it wrote, so that `--force` replaces those and nothing else.

The folder is the user's (it is shared, copied to a model hub, edited), so everything in it is
hostile: the record is bounded and validated, its names stay inside the folder, no path goes
through a symbolic link, and a file export did not write is never replaced or deleted. Every file
is written atomically; the record lists a file before it is written (a killed export leaves no
file that a later `--force` would take for a stranger's) and is rewritten last, exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.store.fileio import (
    atomic_write_bytes,
    atomic_write_chunks,
    parse_json,
    read_regular_file,
)
from disback_cli.store.layout import check_no_links

RECORD = ".disback-export.json"
RECORD_FORMAT = "disback.export-files"
MAX_RECORD_BYTES = 1 << 20
MAX_RECORDED = 10_000
MAX_PATH = 500


def _check_relative(name: object, where: str) -> str:
    """A path inside the folder: relative, POSIX, no '..', no hidden component but the record."""
    parts = PurePosixPath(name).parts if isinstance(name, str) and len(name) <= MAX_PATH else ()
    if not parts or name != "/".join(parts) or any(p in ("..", ".") for p in parts):
        raise DisbackError(f"{where}: {str(name)[:100]!r} is not a path inside the folder")
    if any(p.startswith(".") for p in parts):
        raise DisbackError(f"{where}: {str(name)[:100]!r} is a hidden name")
    return name


def read_record(out: Path) -> set[str]:
    """The files an earlier export wrote in `out` (an empty set when it has no record)."""
    path = check_no_links(out, RECORD)
    if not path.exists():
        return set()
    data = parse_json(read_regular_file(path, MAX_RECORD_BYTES, "export record"))
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or data.get("format") != RECORD_FORMAT:
        raise DisbackError(f"{path}: not a disback export record")
    if len(files) > MAX_RECORDED:
        raise DisbackError(f"{path}: names {len(files):,} files (at most {MAX_RECORDED:,})")
    return {_check_relative(name, str(path)) for name in files}


class ExportFolder:
    """Where one export writes. Opening it refuses a folder that is not empty unless `force`; with
    `force`, files an earlier export recorded may be replaced, and those this export does not
    write again are removed at `finish`; every other file stays."""

    def __init__(self, out: Path, force: bool) -> None:
        self.out = Path(out)
        if self.out.is_symlink():
            raise ConfigError(f"{self.out}: is a symbolic link; export into a plain folder")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: exists and is not a folder")
        entries = sorted(p.name for p in self.out.iterdir()) if self.out.is_dir() else []
        if entries and not force:
            shown = ", ".join(entries[:3]) + (" ..." if len(entries) > 3 else "")
            raise ConfigError(
                f"{self.out}: not empty ({shown}); choose another --out, or pass --force to "
                "replace the files an earlier export wrote there"
            )
        self.earlier = read_record(self.out) if entries else set()
        self.written: dict[str, str] = {}  # relative name -> sha256

    def _target(self, name: str) -> Path:
        """The path of `name`, after refusing links and files export did not write."""
        _check_relative(name, "export")
        path = check_no_links(self.out, name)
        if (path.exists() or path.is_symlink()) and name not in self.earlier | set(self.written):
            raise ConfigError(
                f"{path}: exists and was not written by disback export; move it away "
                "(--force replaces only an earlier export's files)"
            )
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder where export writes a file")
        return path

    def _journal(self, name: str) -> None:
        """List `name` in the record before writing it (see the module docstring)."""
        if name not in self.earlier | set(self.written):
            self._write_record(self.earlier | set(self.written) | {name})

    def write_bytes(self, name: str, data: bytes) -> str:
        path = self._target(name)
        self._journal(name)
        self.written[name] = atomic_write_bytes(path, data)
        return self.written[name]

    def write_chunks(self, name: str, size: int, chunks: Iterable[bytes | memoryview]) -> str:
        path = self._target(name)
        self._journal(name)
        self.written[name] = atomic_write_chunks(path, size, chunks)
        return self.written[name]

    def write_json(self, name: str, value: object) -> str:
        return self.write_bytes(name, (json.dumps(value, indent=2) + "\n").encode())

    def finish(self) -> list[str]:
        """Remove earlier exports' files not written again, then write the exact record; return
        the files of this export."""
        for name in sorted(self.earlier - set(self.written)):
            path = check_no_links(self.out, name)
            if path.is_file():
                path.unlink()
            _remove_empty_parents(self.out, path.parent)
        self._write_record(set(self.written))
        return sorted(self.written)

    def _write_record(self, names: set[str]) -> None:
        record = {"format": RECORD_FORMAT, "files": sorted(names)}
        atomic_write_bytes(check_no_links(self.out, RECORD), json.dumps(record).encode() + b"\n")


def _remove_empty_parents(root: Path, folder: Path) -> None:
    """Empty folders an earlier export's files left, up to (not including) `root`."""
    root = root.resolve()
    while folder.resolve() != root and folder.is_dir() and not folder.is_symlink():
        if any(folder.iterdir()):
            return
        os.rmdir(folder)
        folder = folder.parent
