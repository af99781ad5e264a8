"""The file primitives one by one (`store/fileio.py`): bounded reading of regular files only,
strict JSON, hashing, free-space checks and atomic writes, each failure one line naming the
file. Disk-full and kill cases through whole runs are in test_recovery.py."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from disback_cli.errors import DisbackError
from disback_cli.store import fileio
from disback_cli.store.fileio import (
    DISK_MARGIN,
    atomic_write_bytes,
    atomic_write_chunks,
    check_regular_file,
    check_sha256,
    ensure_free_space,
    hash_regular_file,
    parse_json,
    physical_memory,
    read_json_file,
    read_regular_file,
    sha256_bytes,
    sha256_file,
)


def test_a_regular_file_is_read_up_to_its_bound(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    assert check_regular_file(path, 100, "thing") == 100
    assert read_regular_file(path, 100, "thing") == b"x" * 100
    with pytest.raises(DisbackError) as caught:
        read_regular_file(path, 99, "thing")
    assert str(caught.value) == f"{path}: 0.0 MiB is more than a thing may hold (0.0 MiB)"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a directory, expected a thing"),
        (lambda p: (os.mkfifo(p), p)[1], "not a regular file, expected a thing"),
    ],
)
def test_what_is_not_a_regular_file_is_refused_unread(tmp_path, make, message):
    path = make(tmp_path / "f")
    for read in (read_regular_file, hash_regular_file, check_regular_file):
        with pytest.raises(DisbackError) as caught:
            read(path, 1000, "thing")
        assert str(caught.value) == f"{path}: {message}"


def test_an_unreadable_file_says_why(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files without read permission")
    path = tmp_path / "f"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(DisbackError, match="cannot read \\(Permission denied\\)"):
        read_regular_file(path, 10, "thing")


def test_a_file_that_grows_while_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    real_fstat = os.fstat
    calls = []

    def shrinking_fstat(fd):  # the second look (inside the read) sees the old, smaller size
        info = real_fstat(fd)
        calls.append(info)
        if len(calls) == 2:
            return os.stat_result((*info[:6], 1, *info[7:]))
        return info

    monkeypatch.setattr(fileio.os, "fstat", shrinking_fstat)
    with pytest.raises(DisbackError, match=r"^.*f: changed while being read$"):
        read_regular_file(path, 10, "thing")


def test_json_is_strict():
    assert parse_json(b'{"a": [1, 2.5]}') == {"a": [1, 2.5]}
    for text in ("NaN", "[Infinity]", '{"a": -Infinity}'):
        with pytest.raises(ValueError, match="is not a JSON number"):
            parse_json(text)
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)


def test_a_json_file_that_does_not_parse_is_one_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DisbackError, match=f"^{path}: unreadable recipe \\("):
        read_json_file(path, 100, "recipe")
    path.write_text('{"a": NaN}')
    with pytest.raises(DisbackError, match="NaN is not a JSON number"):
        read_json_file(path, 100, "recipe")
    path.write_text('{"a": 1}')
    assert read_json_file(path, 100, "recipe") == {"a": 1}


def test_hashes_are_sha256_of_the_whole_file(tmp_path):
    path = tmp_path / "f"
    data = os.urandom((1 << 20) + 5)  # more than one block
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert hash_regular_file(path, len(data), "thing") == sha256_file(path) == expected
    check_sha256(path, expected, expected)
    with pytest.raises(DisbackError) as caught:
        check_sha256(path, expected, "0" * 64)
    assert str(caught.value) == (
        f"{path}: sha256 does not match the manifest (file changed or corrupt; --no-verify "
        "skips this check)"
    )


def test_free_space_is_checked_with_a_margin_in_the_nearest_existing_folder(tmp_path, monkeypatch):
    seen = []

    def free(where):
        seen.append(where)
        return 100 + DISK_MARGIN

    monkeypatch.setattr(fileio, "free_bytes", free)
    ensure_free_space(tmp_path / "not" / "yet", 100, "a checkpoint")
    assert seen == [tmp_path]
    with pytest.raises(DisbackError) as caught:
        ensure_free_space(tmp_path, 101, "a checkpoint")
    assert str(caught.value) == (
        f"not enough disk space for a checkpoint in {tmp_path}: needs 0.0 MiB (+64.0 MiB "
        "margin), 64.0 MiB free; free some space and rerun"
    )


def test_an_atomic_write_returns_the_hash_and_creates_its_folder(tmp_path):
    path = tmp_path / "new" / "f.bin"
    digest = atomic_write_chunks(path, 6, [b"abc", memoryview(b"def")])
    assert path.read_bytes() == b"abcdef" and digest == hashlib.sha256(b"abcdef").hexdigest()
    assert atomic_write_bytes(path, b"xyz", durable=False) == hashlib.sha256(b"xyz").hexdigest()
    assert path.read_bytes() == b"xyz" and os.listdir(path.parent) == ["f.bin"]


def test_a_write_of_the_wrong_size_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="wrote 3 bytes, expected 4"):
        atomic_write_chunks(path, 4, [b"new"])
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_is_one_line_and_leaves_the_old_file(tmp_path, code):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def full():
        yield b"n"
        raise OSError(code, os.strerror(code))

    with pytest.raises(DisbackError) as caught:
        atomic_write_chunks(path, 2, full())
    assert str(caught.value) == f"{path}: disk full while writing; the previous file is intact"
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_other_write_errors_pass_through_and_clean_up(tmp_path):
    path = tmp_path / "f.bin"

    def broken():
        yield b"n"
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        atomic_write_chunks(path, 2, broken())
    assert os.listdir(tmp_path) == []


def test_a_durable_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write_bytes(tmp_path / "a", b"1")
    assert len(synced) == 2
    atomic_write_bytes(tmp_path / "b", b"1", durable=False)
    assert len(synced) == 2


def test_an_atomic_write_is_durable_by_default(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write_chunks(tmp_path / "a" / "b" / "f.bin", 1, [b"1"])  # two folders made
    assert len(synced) == 2 and (tmp_path / "a" / "b" / "f.bin").read_bytes() == b"1"


def test_the_temporary_file_is_hidden_beside_its_target(tmp_path):
    seen = []

    def chunks():
        yield b"a"
        seen.extend(os.listdir(tmp_path))

    atomic_write_chunks(tmp_path / "f.bin", 1, chunks())
    assert len(seen) == 1 and fileio_temporary(seen[0])


def fileio_temporary(name: str) -> bool:
    from disback_cli.store.layout import TEMPORARY

    match = TEMPORARY.fullmatch(name)
    return match is not None and match["name"] == "f.bin"


def test_written_files_get_the_usual_mode(tmp_path):
    for umask, mode in ((0o027, 0o640), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            atomic_write_bytes(tmp_path / "f.bin", b"x")
        finally:
            os.umask(old)
        assert (tmp_path / "f.bin").stat().st_mode & 0o777 == mode


def test_a_write_names_its_file_when_the_disk_is_too_full(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "free_bytes", lambda where: 0)
    with pytest.raises(DisbackError, match=r"^not enough disk space for f\.bin in "):
        atomic_write_bytes(tmp_path / "f.bin", b"x")


def test_an_error_after_the_temporary_file_is_gone_is_the_error_itself(tmp_path):
    def chunks():
        yield b"a"
        for name in os.listdir(tmp_path):
            os.unlink(tmp_path / name)
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        atomic_write_chunks(tmp_path / "f.bin", 2, chunks())


def test_the_nesting_refusal_and_the_json_label(tmp_path):
    with pytest.raises(ValueError, match=r"^nested too deeply$"):
        parse_json("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "r.json")
    with pytest.raises(DisbackError, match=r"not a regular file, expected a recipe$"):
        read_json_file(tmp_path / "r.json", 100, "recipe")


def test_bytes_hash_and_physical_memory():
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()
    memory = physical_memory()
    assert isinstance(memory, int) and memory >= 1 << 30  # any machine that runs torch


def test_a_path_that_cannot_be_looked_at_says_why(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DisbackError) as caught:
        check_regular_file(tmp_path / "file" / "x", 10, "thing")
    assert str(caught.value) == f"{tmp_path / 'file' / 'x'}: cannot read (Not a directory)"
