"""Where samples go: an EDM-layout PNG folder or one .npz file, written as `disback sample` draws
them, batch by batch.

A PNG folder gets its completion record first (status `writing`, with every name it is about to
hold), its images as they come (each batch encoded on threads while the next is drawn; under
torchrun each rank writes its own), then `dataset.json` (labels), `prompts.json` (each image's
prompt and seed, for text-to-image samples) and the record again, `complete`, last. An .npz holds
`images` (N, H, W, C uint8) or `samples` (N, ...) float32 with `seeds`, `meta` (the provenance),
`labels` and `prompts` when there are any, written once at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from disback_cli.store.fileio import atomic_write_bytes
from disback_cli.store.images import encode_png, png_name
from disback_cli.store.lock import run_lock
from disback_cli.store.samples import (
    LABELS,
    MAX_SAMPLES,
    PROMPTS,
    check_is_folder,
    prepare_folder,
    write_record,
)

PNG_WRITERS = 4  # threads encoding and writing PNGs (zlib and file writes release the GIL)


def _write_png(path: Path, image: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(image), durable=False)


class PngFolder:
    """Samples as PNG files in EDM's layout (`00000/img00000000.png`, 1000 per folder)."""

    keeps_arrays = False  # images go to disk as they come; nothing is gathered for the end

    def __init__(self, out: Path, names: list[int], meta: dict) -> None:
        self.out, self.names, self.meta = out, names, meta
        self.writer = ThreadPoolExecutor(max_workers=PNG_WRITERS)
        self.writes: list[Future] = []

    def lock(self, main: bool, note) -> contextlib.AbstractContextManager:
        """Rank 0 holds the folder's lock while it is written: a second `sample` into it is
        refused, naming the first, instead of mixing two generators' images."""
        check_is_folder(self.out)
        return run_lock(self.out, "sample", note) if main else contextlib.nullcontext()

    def check(self) -> None:
        """Refuse a folder holding anything but an earlier `disback sample`'s files (every rank
        looks before rank 0 replaces them)."""
        prepare_folder(self.out, MAX_SAMPLES, remove=False)

    def start(self) -> int:
        """Remove an earlier sample's files and record what is about to be written (rank 0);
        returns how many images were replaced."""
        removed = prepare_folder(self.out, MAX_SAMPLES, remove=True)
        write_record(self.out, "writing", self.names, self.meta)
        return removed

    def write(self, names: list[int], images: np.ndarray) -> None:
        self.writes += [
            self.writer.submit(_write_png, self.out / png_name(name), image)
            for image, name in zip(images, names, strict=True)
        ]

    def flush(self) -> None:
        """Wait for this rank's images (a failed write, e.g. a full disk, is raised here)."""
        self.writer.shutdown(wait=True)
        for write in self.writes:
            write.result()
        os.sync()  # one flush for all images instead of an fsync per file

    def finish(self, seeds, labels, items, prompts, arrays) -> dict:
        """Labels, prompts and the completion record, last (rank 0)."""
        entries = None
        if labels is not None:
            entries = [[png_name(s), int(y)] for s, y in zip(seeds, labels, strict=True)]
        atomic_write_bytes(self.out / LABELS, json.dumps({"labels": entries}).encode())
        if prompts is not None:
            listing = [
                {"file": png_name(name), "prompt": prompt, "seed": seed}
                for (name, seed, _), prompt in zip(items, prompts, strict=True)
            ]
            atomic_write_bytes(
                self.out / PROMPTS, json.dumps({"images": listing}, indent=0).encode()
            )
        write_record(self.out, "complete", self.names, self.meta)  # last: the folder is complete
        return {}


class NpzFile:
    """Samples as arrays in one .npz file, written atomically at the end (rank 0)."""

    keeps_arrays = True

    def __init__(self, out: Path, names: list[int], meta: dict, is_image: bool) -> None:
        self.out, self.meta, self.is_image = out, meta, is_image

    def lock(self, main: bool, note) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # written atomically, once, at the end

    def check(self) -> None:
        pass

    def start(self) -> int:
        return 0

    def write(self, names: list[int], images: np.ndarray) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, seeds, labels, items, prompts, arrays) -> dict:
        contents = {
            ("images" if self.is_image else "samples"): np.concatenate(arrays),
            "seeds": np.asarray([seed for _, seed, _ in items], dtype=np.int64),
            "meta": np.asarray(json.dumps(self.meta)),
        }
        if labels is not None:
            contents["labels"] = labels
        if prompts is not None:
            contents["prompts"] = np.asarray(prompts)
        buffer = io.BytesIO()
        np.savez(buffer, **contents)
        return {"sha256": atomic_write_bytes(self.out, buffer.getvalue())}
