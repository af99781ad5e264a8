"""Atomic file writes and hashing: a reader never sees half a file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from disback_cli.errors import DisbackError

DISK_MARGIN = 64 << 20  # keep this much free beyond what a write needs


TMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" beside their target


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files a killed process left under `directory`; return them."""
    found = [p for p in Path(directory).rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(path: str | os.PathLike, digest: str, expected: str) -> None:
    """Refuse a file whose content no longer matches the sha256 its manifest recorded."""
    if digest != expected:
        raise DisbackError(
            f"{path}: sha256 does not match the manifest (file changed or corrupt; "
            "--no-verify skips this check)"
        )


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def free_bytes(directory: str | os.PathLike) -> int:
    return shutil.disk_usage(directory).free


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def ensure_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse before writing `needed` bytes into `directory` if the disk cannot hold them."""
    where = _existing_ancestor(Path(directory))
    free = free_bytes(where)
    if free < needed + DISK_MARGIN:
        raise DisbackError(
            f"not enough disk space for {what} in {directory}: needs {_mib(needed)} "
            f"(+{_mib(DISK_MARGIN)} margin), {_mib(free)} free; free some space and rerun"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> str:
    """Write `data` to `path` via a temporary file, fsync and rename; return its sha256.

    Checks free space first; a failed write removes its temporary file and leaves `path` as it
    was. `durable=False` skips the fsyncs (still atomic for readers and against a crash of this
    process) for many small files that the caller syncs once at the end, e.g. sample PNGs."""
    path = Path(path)
    ensure_free_space(path.parent, len(data), path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            message = f"{path}: disk full while writing; the previous file is intact"
            raise DisbackError(message) from None
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return sha256_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> str:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
