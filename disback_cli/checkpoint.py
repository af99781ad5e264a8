"""Denoiser files: safetensors weights with the network spec and provenance in the metadata.

Used for teachers, path nodes and generators alike, so any of them can be loaded anywhere a
denoiser is expected. Reading hashes the exact bytes it parses.
"""

from __future__ import annotations

import copy
import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import ValidationError
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.fileio import atomic_write_bytes, check_sha256, sha256_bytes
from disback_cli.networks import NetworkSpec, build_denoiser

FORMAT = "disback.denoiser"
FORMAT_VERSION = 1


@dataclass
class DenoiserFile:
    denoiser: nn.Module
    spec: NetworkSpec
    info: dict[str, Any]
    sha256: str


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Safetensors bytes with a canonical header (sorted keys), so equal content gives equal
    sha256; the reference writer orders its metadata randomly."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def tensors_of(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def tensor_bytes(module: nn.Module) -> int:
    """Bytes the module's state dict takes in a file (to check disk space before writing)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def save_denoiser(
    path: str | Path,
    denoiser: nn.Module,
    spec: NetworkSpec,
    info: dict,
    dtype: torch.dtype | None = None,
) -> str:
    """Write the denoiser's weights atomically (floating tensors cast to `dtype` if given);
    return the file's sha256."""
    tensors = tensors_of(denoiser)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "network": spec.model_dump_json(),
        "info": json.dumps(info, sort_keys=True),
    }
    return atomic_write_bytes(path, encode_safetensors(tensors, metadata))


def read_safetensors(
    path: str | Path, expected_sha256: str | None = None, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """Tensors, metadata and sha256 of a safetensors file, with one-line errors for bad files.

    With `expected_sha256` the file must hash to it; `verify=False` skips hashing (and the check)
    for huge trusted files and returns None as the hash."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DisbackError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DisbackError(f"{path}: is a directory, expected a .safetensors file") from None
    except OSError as exc:
        raise DisbackError(f"{path}: cannot read ({exc.strerror})") from None
    digest = sha256_bytes(data) if verify else None
    if verify and expected_sha256 is not None:
        check_sha256(path, digest, expected_sha256)
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = safetensors.torch.load(data)
    except Exception:
        raise DisbackError(f"{path}: not a valid safetensors file (truncated or corrupt)") from None
    return tensors, metadata, digest


def load_denoiser(
    path: str | Path,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
    verify: bool = True,
) -> DenoiserFile:
    """Rebuild a denoiser from a disback denoiser file and load its weights strictly
    (checked against `expected_sha256` unless `verify` is off; see `read_safetensors`)."""
    tensors, metadata, digest = read_safetensors(path, expected_sha256, verify)
    if metadata.get("format") != FORMAT:
        raise DisbackError(f"{path}: not a disback denoiser file (metadata 'format' missing)")
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise DisbackError(
            f"{path}: denoiser format version {version} is newer than this disback "
            f"understands ({FORMAT_VERSION}); upgrade disback"
        )
    try:
        spec = NetworkSpec.model_validate_json(metadata["network"])
        info = json.loads(metadata.get("info", "{}"))
    except (KeyError, ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise DisbackError(f"{path}: bad network metadata ({first})") from None
    denoiser = build_with_weights(spec, tensors, str(path))
    sha256 = digest or expected_sha256 or ""
    return DenoiserFile(denoiser.to(device).eval().requires_grad_(False), spec, info, sha256)


@functools.lru_cache(maxsize=8)
def _meta_network(spec_json: str) -> nn.Module:
    """An uninitialised network (meta tensors) to copy: building one is slow, copying is not."""
    with torch.device("meta"):
        return build_denoiser(NetworkSpec.model_validate_json(spec_json))


def build_with_weights(spec: NetworkSpec, tensors: dict[str, torch.Tensor], source: str):
    """The network of `spec` holding exactly `tensors` (as float32), loaded strictly.

    Built on the meta device: no initialisation compute and no draws from the global random
    stream, so loading a network mid-run does not shift dropout noise. Files may hold bf16
    (`record --node-dtype bf16`) or fp16 (EDM pickles); computation uses float32 weights."""
    denoiser = copy.deepcopy(_meta_network(spec.model_dump_json()))
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    load_weights(denoiser, tensors, source, assign=True)
    return denoiser


def load_weights(
    module: nn.Module, tensors: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """Strict load with a one-line explanation of any mismatch (keys or shapes); `assign` adopts
    the tensors themselves (for modules built on the meta device)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DisbackError(
            f"{source}: weights do not match the network "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:2]})"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise DisbackError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, the network expects "
                f"{tuple(expected[key].shape)} (a file from another teacher?)"
            )
    module.load_state_dict(tensors, strict=True, assign=assign)
