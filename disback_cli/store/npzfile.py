""".npz files from anyone (samples, references): array sizes are checked before numpy allocates.

numpy allocates an array of the shape an .npy header declares before it reads the data, so a
200-byte file may ask for terabytes. Here each member's header is read first and its declared
size checked against the member's actual size and against the memory of this machine.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from disback_cli.errors import DisbackError
from disback_cli.store import fileio
from disback_cli.store.archives import check_member
from disback_cli.store.fileio import check_regular_file, parse_json

MAX_NPZ_BYTES = 1 << 40
NUMERIC_KINDS = "biufU"  # booleans, integers, floats and text (the `meta` string); no objects


def _declared(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, int]:
    """Shape, dtype and header length of an .npy member, from its header alone."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        return shape, dtype, member.tell()


def read_npz(path: Path, what: str = ".npz file") -> dict[str, np.ndarray]:
    """Every array of an .npz, each checked (plain numeric or text dtype, declared size equal to
    the stored size, fits in memory) before it is loaded; one-line errors for anything else."""
    check_regular_file(path, MAX_NPZ_BYTES, what)
    budget = fileio.physical_memory() // 2
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = [i for i in archive.infolist() if i.filename.endswith(".npy")]
            if len(members) > 1000:
                raise ValueError(f"{len(members)} arrays")
            total = 0
            for info in members:
                check_member(info, MAX_NPZ_BYTES, f"{path}:{info.filename}")
                shape, dtype, header = _declared(archive, info)
                if dtype.kind not in NUMERIC_KINDS or dtype.hasobject or dtype.fields:
                    raise ValueError(f"{info.filename}: arrays of {dtype} are not supported")
                nbytes = math.prod(shape) * dtype.itemsize
                total += nbytes
                if nbytes != info.file_size - header or total > budget:
                    raise ValueError(f"{info.filename}: declared shape {shape} does not fit")
            for info in members:
                with archive.open(info) as member:
                    arrays[info.filename[: -len(".npy")]] = np.lib.format.read_array(
                        member, allow_pickle=False
                    )
    except (
        OSError,
        ValueError,
        EOFError,
        NotImplementedError,
        RuntimeError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
    ) as exc:
        raise DisbackError(f"{path}: not a readable {what} ({exc})") from None
    return arrays


def read_meta(arrays: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    """The JSON `meta` string disback stores in its .npz files ({} when absent)."""
    if "meta" not in arrays:
        return {}
    try:
        meta = parse_json(str(arrays["meta"]))
    except ValueError as exc:
        raise DisbackError(f"{path}: unreadable 'meta' entry ({exc})") from None
    if not isinstance(meta, dict):
        raise DisbackError(f"{path}: 'meta' entry is not a JSON object")
    return meta
