"""One process per run directory: an advisory lock that dies with its holder.

The lock is `flock` on `<dir>/.lock`, so the kernel releases it when the holder exits in any way
(SIGKILL included). The file also names the holder (pid, host, command) for the refusal message;
a file left behind by a dead holder is stale and is taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.runtime import Reporter

LOCK_FILE = ".lock"


def _holder(lock_path: Path) -> dict:
    try:
        return json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _open_locked(directory: Path) -> int:
    """An fd holding the flock of the lock file currently at `directory/.lock`."""
    lock_path = directory / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DisbackError(f"{directory}: cannot write here ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(lock_path)
            raise DisbackError(
                f"{directory} is in use by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} ({holder.get('command', 'disback')}); wait for it "
                "to finish or stop it first"
            ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file meanwhile: lock the new one


@contextlib.contextmanager
def run_lock(
    directory: str | Path, command: str, reporter: Reporter | None = None
) -> Iterator[None]:
    """Hold the lock of `directory` (created if needed; removed again if left empty)."""
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DisbackError(f"{directory}: cannot create the directory ({exc.strerror})") from None
    fd = _open_locked(directory)
    lock_path = directory / LOCK_FILE
    try:
        stale = _holder(lock_path)
        if stale and reporter is not None:
            reporter.note(
                f"{directory}: taking over a stale lock of pid {stale.get('pid')} on "
                f"{stale.get('host')} (that process is gone)"
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
