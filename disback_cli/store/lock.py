"""One process per run directory: an advisory lock that dies with its holder.

The lock is `flock` on `<dir>/.lock`, so the kernel releases it when the holder exits in any way
(SIGKILL included). The file also names the holder (pid, host, command) for the refusal message;
a file left behind by a dead holder is stale and is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.store.layout import LOCK

LOCK_FILE = LOCK


def _holder(fd: int) -> dict[str, str]:
    """Who wrote the lock file (pid, host, command), as short printable strings; {} if unknown.

    The file may come from anyone (a shared run directory), so it is read through the open
    descriptor, capped, and every value is reduced to a short printable string."""
    try:
        raw = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {
        key: "".join(c for c in str(raw[key])[:80] if c.isprintable())
        for key in ("pid", "host", "command")
        if key in raw
    }


def _open_locked(directory: Path) -> int:
    """An fd holding the flock of the lock file currently at `directory/.lock`."""
    lock_path = directory / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DisbackError(
                    f"{lock_path}: is a symbolic link; disback does not follow links inside a "
                    "run directory"
                ) from None
            raise DisbackError(f"{directory}: cannot write here ({exc.strerror})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:  # a hard link shares its
            os.close(fd)  # content with a file elsewhere, which writing the holder would destroy
            raise DisbackError(f"{lock_path}: not a regular file of its own (a link?)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DisbackError(
                f"{directory} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} ({holder.get('command', 'disback')}); wait for it "
                "to finish or stop it first"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path, follow_symlinks=False).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file meanwhile: lock the new one


@contextlib.contextmanager
def run_lock(
    directory: str | Path, command: str, note: Callable[[str], None] = lambda text: None
) -> Iterator[None]:
    """Hold the lock of `directory` (created if needed; removed again if left empty); `note`
    tells the user when a stale lock is taken over."""
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DisbackError(f"{directory}: cannot create the directory ({exc.strerror})") from None
    fd = _open_locked(directory)
    lock_path = directory / LOCK_FILE
    try:
        stale = _holder(fd)
        if stale:
            note(
                f"{directory}: taking over a stale lock of pid {stale.get('pid', '?')} on "
                f"{stale.get('host', '?')} (that process is gone)"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": f"disback {command}"}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)
            for path in created:  # innermost first; only what this lock created and left empty
                if any(path.iterdir()):
                    break
                path.rmdir()
    finally:
        os.close(fd)  # releases the flock
