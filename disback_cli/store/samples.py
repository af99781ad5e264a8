"""Sample sets on disk: PNG folders with their completion record, and .npz files of samples.

`disback sample --format png` writes `provenance.json` (kind `disback.samples`) twice: first with
status `writing` and the seeds it is about to write, last with status `complete`. So `evaluate`
can tell a finished folder from one a kill cut short, or one that gained other images since, and
a later `sample` into the same folder knows exactly which files are its own to replace.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from disback_cli.config import MAX_SAMPLES
from disback_cli.errors import DisbackError
from disback_cli.store.fileio import TMP_SUFFIX, atomic_write_bytes, parse_json, read_regular_file
from disback_cli.store.images import png_name
from disback_cli.store.layout import LOCK
from disback_cli.store.npzfile import read_meta, read_npz

RECORD = "provenance.json"
LABELS = "dataset.json"  # EDM's labels file
PROMPTS = "prompts.json"  # text-to-image samples: each image's prompt and seed
KIND = "disback.samples"
SUBFOLDER = re.compile(r"\d{5}")
MAX_RECORD_BYTES = 64 << 20
SHOWN = 3


def seed_ranges(seeds: Sequence[int]) -> list[list[int]]:
    """[[first, last], ...] runs of consecutive seeds: 50k seeds are one pair, not 50k numbers."""
    ranges: list[list[int]] = []
    for seed in seeds:
        if ranges and seed == ranges[-1][1] + 1:
            ranges[-1][1] = seed
        else:
            ranges.append([seed, seed])
    return ranges


def _expand(ranges: object, limit: int) -> list[int]:
    if not isinstance(ranges, list):
        raise ValueError("seeds must be a list of [first, last] pairs")
    seeds: list[int] = []
    for pair in ranges:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair)
            and pair[0] <= pair[1]
            and len(seeds) + pair[1] - pair[0] < limit
        ):
            raise ValueError("seeds must be a list of [first, last] pairs of at most the limit")
        seeds.extend(range(pair[0], pair[1] + 1))
    return seeds


def read_record(folder: Path, limit: int) -> dict | None:
    """The folder's completion record, None if it has none (a foreign folder, or one written by
    a disback older than this record); a malformed record is refused."""
    path = folder / RECORD
    if not path.is_file() or path.is_symlink():
        return None
    try:
        record = parse_json(read_regular_file(path, MAX_RECORD_BYTES, "sample record"))
    except ValueError as exc:
        raise DisbackError(f"{path}: unreadable sample record ({exc})") from None
    if not isinstance(record, dict) or record.get("kind") != KIND:
        return None
    try:
        if record.get("status") not in ("writing", "complete"):
            raise ValueError("status must be 'writing' or 'complete'")
        record["seeds"] = _expand(record.get("seeds"), limit)
    except ValueError as exc:
        raise DisbackError(f"{path}: malformed sample record ({exc})") from None
    return record


def _entries(folder: Path) -> list[str]:
    """Every file, folder and link under `folder`, relative, without following links."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found += [str(base / name) for name in dirs + files]
    return sorted(found)


def _ours(record: dict | None) -> set[str]:
    """Names the record's `sample` may have written (without a record: none, since the record is
    written before anything else)."""
    if record is None:
        return set()
    return {RECORD, LABELS, PROMPTS} | {png_name(seed) for seed in record["seeds"]}


def _is_ours(entry: str, folder: Path, ours: set[str]) -> bool:
    path = folder / entry
    if path.is_symlink():
        return False
    if entry == LOCK:  # held by the `sample` writing the folder (see `sample_writers`)
        return path.is_file()
    if path.is_dir():
        return SUBFOLDER.fullmatch(entry) is not None
    parent, name = os.path.split(entry)
    if name.endswith(TMP_SUFFIX):  # a temporary of an atomic write: ".<name>.<random>.tmp"
        inner = os.path.join(parent, name[1:].rsplit(".", 2)[0])
        return inner in ours or inner == RECORD  # a kill while the first record was written
    return entry in ours


def _describe(entries: list[str]) -> str:
    more = f" and {len(entries) - SHOWN} more" if len(entries) > SHOWN else ""
    return ", ".join(entries[:SHOWN]) + more


def check_is_folder(folder: Path) -> None:
    """Refuse an --out that is a file or a link (before anything, its lock included, is made)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise DisbackError(f"{folder}: exists and is not a folder; choose another --out")


def prepare_folder(folder: Path, limit: int, remove: bool) -> int:
    """Check that `folder` can take new samples: absent or empty, or holding only files an earlier
    `disback sample` wrote. With `remove`, those are deleted (their image count is returned). A
    folder with anything else is refused, and nothing in it is touched."""
    check_is_folder(folder)
    if not folder.exists():
        return 0
    ours = _ours(read_record(folder, limit))
    entries = _entries(folder)
    foreign = [e for e in entries if not _is_ours(e, folder, ours)]
    if foreign:
        raise DisbackError(
            f"{folder} holds files `disback sample` did not write ({_describe(foreign)}); "
            "choose an empty or new --out"
        )
    removed = 0
    for entry in reversed(entries) if remove else []:  # files before the folders holding them
        path = folder / entry
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        elif entry != LOCK:  # the lock of the `sample` about to write here
            path.unlink()
            removed += entry.endswith(".png")
    return removed


def write_record(folder: Path, status: str, seeds: Sequence[int], meta: dict) -> None:
    record = {
        "kind": KIND,
        "status": status,
        "count": len(seeds),
        "seeds": seed_ranges(seeds),
        **meta,
    }
    atomic_write_bytes(folder / RECORD, json.dumps(record, indent=1).encode())


def complete_images(folder: Path, image_suffixes: set[str], limit: int) -> list[Path]:
    """The images of a finished `disback sample` folder, in seed order; refuses a folder without a
    completion record, one a kill cut short, and one with images the record does not list."""
    record = read_record(folder, limit)
    if record is None:
        raise DisbackError(
            f"{folder}: not a folder written by `disback sample` (no completion record "
            f"{RECORD}); pass --any-images to score the images of another source"
        )
    if record["status"] != "complete":
        raise DisbackError(
            f"{folder}: `disback sample` did not finish writing this folder (killed?); "
            "sample it again"
        )
    expected = [png_name(seed) for seed in record["seeds"]]
    present = {e for e in _entries(folder) if Path(e).suffix.lower() in image_suffixes}
    extra = sorted(present - set(expected))
    missing = [name for name in expected if name not in present]
    if extra:
        raise DisbackError(
            f"{folder}: holds {len(extra)} images the sample record does not list "
            f"({_describe(extra)}); pass --any-images to score them all"
        )
    if missing:
        raise DisbackError(
            f"{folder}: {len(missing)} images of the sample record are missing "
            f"({_describe(missing)})"
        )
    return [folder / name for name in expected]


def read_provenance(path: Path) -> dict:
    """What `disback sample` recorded about a sample set (empty for foreign files)."""
    if path.is_dir():
        return read_record(path, MAX_SAMPLES) or {}
    if path.suffix == ".npz" and path.is_file():
        return read_meta(read_npz(path), path)
    return {}


def read_samples(path: Path) -> tuple[torch.Tensor, dict]:
    """Samples and provenance from an .npz written by `disback sample` (or any `samples` array):
    at least two, all finite, each a vector."""
    arrays = read_npz(path)
    if "samples" not in arrays:
        raise DisbackError(f"{path}: no 'samples' array in this .npz")
    samples = arrays["samples"]
    if samples.dtype.kind not in "biuf" or samples.ndim < 2:
        raise DisbackError(
            f"{path}: 'samples' must be numbers of shape (N, ...), got {samples.dtype} "
            f"{samples.shape}"
        )
    if len(samples) < 2:
        raise DisbackError(f"{path}: {len(samples)} samples; evaluation needs at least 2")
    samples = torch.from_numpy(np.asarray(samples, dtype=np.float32))
    if not bool(torch.isfinite(samples).all()):
        raise DisbackError(f"{path}: samples contain NaN or infinite values")
    return samples, read_meta(arrays, path)
