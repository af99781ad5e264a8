"""Components of model folders in the Hugging Face layouts (diffusers, transformers): their JSON
configs, read bounded, and their safetensors weights; a component stored only as a pickle is
refused, naming the file, because unpickling can run code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import check_regular_file, read_json_file
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES

MAX_CONFIG_BYTES = 1 << 20
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def read_config(path: Path, what: str) -> dict[str, Any]:
    data = read_json_file(path, MAX_CONFIG_BYTES, what)
    if not isinstance(data, dict):
        raise DisbackError(f"{path}: {what} must be a JSON object")
    return data


def find_weights(folder: Path, stem: str) -> Path:
    """The safetensors weights of a component (the full-precision file, else the fp16 variant),
    or a refusal naming the pickle file that is there instead."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).exists():
            check_regular_file(folder / name, MAX_SAFETENSORS_BYTES, "safetensors file")
            return folder / name
    if any(folder.glob(f"{stem}*.safetensors.index.json")):
        raise DisbackError(
            f"{folder}: sharded weights are not supported; merge the shards "
            "into one .safetensors file"
        )
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise DisbackError(
            f"{pickles[0]}: weights stored as a pickle, which can run code when loaded; "
            "disback reads only .safetensors: convert it once where you trust the file, "
            "e.g. Model.from_pretrained(FOLDER).save_pretrained(FOLDER, safe_serialization=True)"
        )
    raise DisbackError(f"{folder}: no {stem}.safetensors weights")
