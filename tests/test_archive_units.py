"""The zip reader's bounds one by one (`store/archives.py`): size, inflation and encryption of a
member judged from its header before anything is decompressed, and each failure one line naming
the member. Whole hostile archives are in test_hostile_readers.py."""

from __future__ import annotations

import os
import zipfile

import pytest

from disback_cli.errors import DisbackError
from disback_cli.store.archives import (
    MAX_RATIO,
    SMALL_MEMBER,
    check_member,
    open_zip,
    read_member,
)


def member(file_size: int, compress_size: int, flag_bits: int = 0) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("m.png")
    info.file_size, info.compress_size, info.flag_bits = file_size, compress_size, flag_bits
    return info


def test_a_member_may_hold_up_to_its_bound_and_not_a_byte_more():
    check_member(member(1000, 1000), 1000, "z:m.png")
    with pytest.raises(DisbackError) as caught:
        check_member(member(1001, 1001), 1000, "z:m.png")
    assert str(caught.value) == "z:m.png: 1,001 bytes, more than 1,000"


def test_inflation_is_bounded_by_a_ratio_beyond_small_members():
    limit = 1 << 40
    compressed = SMALL_MEMBER // 10  # a ratio of 100 reaches 10x past the small-member size
    check_member(member(MAX_RATIO * compressed, compressed), limit, "z:m")
    with pytest.raises(DisbackError) as caught:
        check_member(member(MAX_RATIO * compressed + 1, compressed), limit, "z:m")
    assert str(caught.value) == (
        f"z:m: inflates {MAX_RATIO * compressed + 1:,} bytes from {compressed:,} (a zip bomb?)"
    )
    check_member(member(SMALL_MEMBER, 1), limit, "z:m")  # small members inflate as they like
    with pytest.raises(DisbackError, match="a zip bomb"):
        check_member(member(SMALL_MEMBER + 1, 1), limit, "z:m")


def test_an_encrypted_member_is_refused_and_other_flags_are_not():
    with pytest.raises(DisbackError, match=r"^z:m: encrypted zip members are not supported$"):
        check_member(member(10, 10, flag_bits=0x1), 100, "z:m")
    check_member(member(10, 10, flag_bits=0x2 | 0x8 | 0x800), 100, "z:m")  # options, UTF-8


def test_what_is_not_a_zip_is_refused_naming_it(tmp_path):
    (tmp_path / "a.zip").write_bytes(b"not a zip")
    with pytest.raises(DisbackError, match=f"^{tmp_path / 'a.zip'}: not a readable zip \\("):
        open_zip(tmp_path / "a.zip", "dataset zip")
    os.mkfifo(tmp_path / "f.zip")
    with pytest.raises(DisbackError, match=r"not a regular file, expected a dataset zip$"):
        open_zip(tmp_path / "f.zip", "dataset zip")


def test_a_missing_or_damaged_member_is_one_line_naming_it(tmp_path):
    data = bytes(range(256)) * 64
    with zipfile.ZipFile(tmp_path / "a.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("m.bin", data)
        info = archive.getinfo("m.bin")
    archive = open_zip(tmp_path / "a.zip", "zip")
    assert read_member(archive, "m.bin", 1 << 20, "a.zip:m.bin") == data
    with pytest.raises(DisbackError, match=r"^a.zip:x.bin: no such member$"):
        read_member(archive, "x.bin", 1 << 20, "a.zip:x.bin")
    with pytest.raises(DisbackError, match=r"^a.zip:m.bin: 16,384 bytes, more than 100$"):
        read_member(archive, "m.bin", 100, "a.zip:m.bin")
    raw = bytearray((tmp_path / "a.zip").read_bytes())
    start = info.header_offset + 30 + len(info.filename)
    raw[start : start + 4] = b"\xff\xff\xff\xff"  # not a deflate stream any more
    (tmp_path / "b.zip").write_bytes(bytes(raw))
    with pytest.raises(DisbackError) as caught:
        read_member(open_zip(tmp_path / "b.zip", "zip"), "m.bin", 1 << 20, "b.zip:m.bin")
    message = str(caught.value)
    assert message.startswith("b.zip:m.bin: unreadable zip member (") and "\n" not in message
    assert message.endswith("(error)")  # zlib's own exception, named by its type
