"""Atomic file writes and hashing: a reader never sees half a file."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from disback_cli.errors import DisbackError

DISK_MARGIN = 64 << 20  # keep this much free beyond what a write needs


TMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" beside their target


def check_regular_file(path: str | os.PathLike, max_bytes: int, what: str) -> int:
    """The size of a regular file of at most `max_bytes`, or a one-line refusal: checked before
    reading, so a device (/dev/zero), a FIFO or a huge file named by a flag or a manifest cannot
    hang the process or exhaust its memory."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DisbackError(f"{path}: no such file") from None
    except OSError as exc:
        raise DisbackError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise DisbackError(f"{path}: is a directory, expected a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise DisbackError(f"{path}: not a regular file, expected a {what}")
    if info.st_size > max_bytes:
        raise DisbackError(
            f"{path}: {_mib(info.st_size)} is more than a {what} may hold ({_mib(max_bytes)})"
        )
    return info.st_size


@contextlib.contextmanager
def open_regular_file(path: str | os.PathLike, max_bytes: int, what: str) -> Iterator[BinaryIO]:
    """A regular file of at most `max_bytes`, open for reading (see `check_regular_file`). It is
    opened without blocking and checked again on its descriptor, so one swapped for a FIFO or a
    device after the first check is refused rather than waited on; read errors are one line."""
    check_regular_file(path, max_bytes, what)
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                raise DisbackError(f"{path}: changed while being read")
            yield f
    except OSError as exc:
        raise DisbackError(f"{path}: cannot read ({exc.strerror})") from None


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see `open_regular_file`)."""
    with open_regular_file(path, max_bytes, what) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1)
    if len(data) > size:  # grew after the check
        raise DisbackError(f"{path}: changed while being read")
    return data


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: bytes | str) -> Any:
    """Strict JSON: NaN and Infinity are refused, as is nesting deep enough to exhaust the stack
    (ValueError for both)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json_file(path: str | os.PathLike, max_bytes: int, what: str) -> Any:
    data = read_regular_file(path, max_bytes, what)
    try:
        return parse_json(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DisbackError(f"{path}: unreadable {what} ({exc})") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(path: str | os.PathLike, digest: str, expected: str) -> None:
    """Refuse a file whose content no longer matches the sha256 its manifest recorded."""
    if digest != expected:
        raise DisbackError(
            f"{path}: sha256 does not match the manifest (file changed or corrupt; "
            "--no-verify skips this check)"
        )


def hash_regular_file(path: str | os.PathLike, max_bytes: int, what: str) -> str:
    """sha256 of a regular file (see `open_regular_file`), read in blocks, nothing parsed."""
    digest = hashlib.sha256()
    with open_regular_file(path, max_bytes, what) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Write `data` to `path` atomically (see `atomic_write_chunks`); return its sha256."""
    return atomic_write_chunks(path, len(data), [data], durable)


def atomic_write_chunks(
    path: str | os.PathLike, size: int, chunks: Iterable[bytes | memoryview], durable: bool = True
) -> str:
    """Write `chunks` (`size` bytes in all) to `path` via a temporary file, fsync and rename;
    return the sha256 of what was written. The chunks are written and hashed one at a time, so a
    checkpoint never needs a second copy of itself in memory.

    Checks free space first; a failed write removes its temporary file and leaves `path` as it
    was. `durable=False` skips the fsyncs (still atomic for readers and against a crash of this
    process) for many small files that the caller syncs once at the end, e.g. sample PNGs."""
    path = Path(path)
    ensure_free_space(path.parent, size, path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    digest, written = hashlib.sha256(), 0
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                written += memoryview(chunk).nbytes
            if written != size:
                raise RuntimeError(f"{path}: wrote {written} bytes, expected {size}")
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
        fsync_directory(path.parent)
    return digest.hexdigest()


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (its entry survives a power loss)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def physical_memory() -> int:
    """Bytes of RAM of this machine (readers bound what they allocate by it)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
