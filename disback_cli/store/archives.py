"""Zip archives anyone may write (EDM dataset zips, `.npz` files), read with bounds: a member's
declared size and its inflation are checked before it is decompressed, and every failure of the
zip library (bad CRC, unknown compression, encryption, truncation) is one line naming the member.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import check_regular_file

MAX_ARCHIVE_BYTES = 1 << 40
# Deflate reaches ~1030x on constant data; images, arrays and label lists inflate far less. A
# member may inflate up to MAX_RATIO times, or to SMALL_MEMBER bytes whatever its ratio.
MAX_RATIO = 100
SMALL_MEMBER = 64 << 20


def open_zip(path: Path, what: str) -> zipfile.ZipFile:
    """A zip archive that is a regular file (a FIFO or a device is refused, not read)."""
    check_regular_file(path, MAX_ARCHIVE_BYTES, what)
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, NotImplementedError, ValueError) as exc:
        raise DisbackError(f"{path}: not a readable zip ({exc})") from None


def check_member(info: zipfile.ZipInfo, limit: int, where: str) -> None:
    """Refuse a member whose declared size is over `limit`, or that inflates more than any
    real content does (a zip bomb), before anything is decompressed."""
    if info.file_size > limit:
        raise DisbackError(f"{where}: {info.file_size:,} bytes, more than {limit:,}")
    if info.file_size > max(MAX_RATIO * info.compress_size, SMALL_MEMBER):
        raise DisbackError(
            f"{where}: inflates {info.file_size:,} bytes from {info.compress_size:,} (a zip bomb?)"
        )
    if info.flag_bits & 0x1:
        raise DisbackError(f"{where}: encrypted zip members are not supported")


def read_member(archive: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    """The bytes of one member, checked by `check_member` (the zip library reads no more than
    the declared size, and a member whose data disagree with it fails its CRC check)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise DisbackError(f"{where}: no such member") from None
    check_member(info, limit, where)
    try:
        with archive.open(info) as member:
            return member.read()
    except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
        raise DisbackError(f"{where}: unreadable zip member ({exc})") from None
    except Exception as exc:  # zlib.error and whatever else a damaged stream raises
        raise DisbackError(f"{where}: unreadable zip member ({type(exc).__name__})") from None
