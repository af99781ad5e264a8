"""An export folder: files `disback export` writes for other tools, and the record of which files
it wrote, so that `--force` replaces those and nothing else.

The folder is the user's (it is shared, copied to a model hub, edited), so everything in it is
hostile: the record is bounded and validated, its names stay inside the folder, no path goes
through a symbolic link, and a file is replaced or deleted only while its content is the sha256
the record gives for it (a record naming someone else's file, or a file edited since, protects
nothing but itself). Every file is written atomically; the record lists a file before it is
written and with its sha256 once written, and is rewritten last, exactly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.store.fileio import (
    atomic_write_bytes,
    atomic_write_chunks,
    parse_json,
    read_regular_file,
    sha256_file,
)
from disback_cli.store.layout import check_no_links

RECORD = ".disback-export.json"
RECORD_FORMAT = "disback.export-files"
MAX_RECORD_BYTES = 1 << 20
MAX_RECORDED = 10_000
MAX_PATH = 500
SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_relative(name: object, where: str) -> str:
    """A path inside the folder: relative, POSIX, no '..', no hidden component but the record."""
    parts = PurePosixPath(name).parts if isinstance(name, str) and len(name) <= MAX_PATH else ()
    if not parts or name != "/".join(parts) or any(p in ("..", ".") for p in parts):
        raise DisbackError(f"{where}: {str(name)[:100]!r} is not a path inside the folder")
    if any(p.startswith(".") for p in parts):
        raise DisbackError(f"{where}: {str(name)[:100]!r} is a hidden name")
    return name


def read_record(out: Path) -> dict[str, str | None]:
    """The files an earlier export wrote in `out` with their sha256 (None: listed, but the export
    stopped before it finished writing it); empty when the folder has no record."""
    path = check_no_links(out, RECORD)
    if not path.exists():
        return {}
    data = parse_json(read_regular_file(path, MAX_RECORD_BYTES, "export record"))
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("format") != RECORD_FORMAT:
        raise DisbackError(f"{path}: not a disback export record")
    if len(files) > MAX_RECORDED:
        raise DisbackError(f"{path}: names {len(files):,} files (at most {MAX_RECORDED:,})")
    for name, sha in files.items():
        _check_relative(name, str(path))
        if sha is not None and not (isinstance(sha, str) and SHA256.fullmatch(sha)):
            raise DisbackError(f"{path}: {name[:100]!r} has no valid sha256")
    return files


class ExportFolder:
    """Where one export writes. Opening it refuses a folder that is not empty unless `force`; with
    `force`, a file an earlier export recorded may be replaced, and is removed at `finish` if this
    export does not write it again, but only while it is still the file export wrote (its
    recorded sha256); every other file stays."""

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
        self.earlier = read_record(self.out) if entries else {}
        self.written: dict[str, str] = {}  # relative name -> sha256

    def _still_ours(self, name: str, path: Path) -> bool:
        """An earlier export's file, unchanged since it wrote it."""
        recorded = self.earlier.get(name)
        return recorded is not None and path.is_file() and sha256_file(path) == recorded

    def _target(self, name: str) -> Path:
        """The path of `name`, after refusing links and files export did not write."""
        _check_relative(name, "export")
        path = check_no_links(self.out, name)
        exists = path.exists() or path.is_symlink()
        if exists and name not in self.written and not self._still_ours(name, path):
            raise ConfigError(
                f"{path}: exists and is not a file disback export wrote (or it changed since); "
                "move it away (--force replaces only an earlier export's unchanged files)"
            )
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder where export writes a file")
        return path

    def _record_now(self, pending: str | None = None) -> None:
        """The record as the folder stands: earlier files not yet replaced, this export's files,
        and `pending`, listed before it is written (see the module docstring)."""
        files = {**self.earlier, **self.written}
        if pending is not None:
            files[pending] = None
        self._write_record(files)

    def write_bytes(self, name: str, data: bytes) -> str:
        return self.write_chunks(name, len(data), [data])

    def write_chunks(self, name: str, size: int, chunks: Iterable[bytes | memoryview]) -> str:
        path = self._target(name)
        self._record_now(pending=name)
        self.written[name] = atomic_write_chunks(path, size, chunks)
        self.earlier.pop(name, None)
        self._record_now()
        return self.written[name]

    def write_json(self, name: str, value: object) -> str:
        return self.write_bytes(name, (json.dumps(value, indent=2) + "\n").encode())

    def finish(self) -> list[str]:
        """Remove earlier exports' unchanged files not written again, then write the exact
        record; return the files of this export."""
        for name in sorted(self.earlier):
            path = check_no_links(self.out, name)
            if self._still_ours(name, path):
                path.unlink()
                _remove_empty_parents(self.out, path.parent)
        self._write_record(dict(self.written))
        return sorted(self.written)

    def _write_record(self, files: dict[str, str | None]) -> None:
        record = {"format": RECORD_FORMAT, "files": dict(sorted(files.items()))}
        atomic_write_bytes(check_no_links(self.out, RECORD), json.dumps(record).encode() + b"\n")


def _remove_empty_parents(root: Path, folder: Path) -> None:
    """Empty folders an earlier export's files left, up to (not including) `root`."""
    root = root.resolve()
    while folder.resolve() != root and folder.is_dir() and not folder.is_symlink():
        if any(folder.iterdir()):
            return
        os.rmdir(folder)
        folder = folder.parent
