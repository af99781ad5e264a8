"""safetensors files written canonically and read with one-line errors."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import (
    check_sha256,
    open_regular_file,
    parse_json,
    read_regular_file,
    sha256_bytes,
)

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

MAX_SAFETENSORS_BYTES = 32 << 30  # far above any network we run; refused unread beyond this
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own bound on a header


def whole_tensor(value: torch.Tensor) -> torch.Tensor:
    """A (sharded) tensor whole, on every process (a collective for a sharded one)."""
    full_tensor = getattr(value, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else value.detach()


def safetensors_chunks(
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str],
    float_dtype: torch.dtype | None = None,
) -> tuple[int, Iterator[bytes | memoryview]]:
    """A safetensors file as (size, pieces): the header, then each tensor's bytes, made whole
    (gathered, if sharded), moved to the CPU and cast (floating tensors, to `float_dtype` if
    given) one at a time in name order, for `atomic_write_chunks`: a checkpoint never needs a
    second copy of its network in memory. The header is canonical (sorted keys), so equal
    content gives equal sha256; the reference writer orders its metadata randomly."""
    names = sorted(tensors)

    def stored(tensor: torch.Tensor) -> torch.dtype:
        return float_dtype if float_dtype and tensor.is_floating_point() else tensor.dtype

    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        tensor = tensors[name]
        end = offset + tensor.numel() * stored(tensor).itemsize
        header[name] = {
            "dtype": _DTYPES[stored(tensor)],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def pieces() -> Iterator[bytes | memoryview]:
        yield struct.pack("<Q", len(text)) + text
        for name in names:
            tensor = whole_tensor(tensors[name])
            tensor = tensor.to("cpu", stored(tensor)).contiguous()
            yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy())

    return 8 + len(text) + offset, pieces()


def encode_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The whole file in memory (for small files and tests; checkpoints use the chunks)."""
    return b"".join(safetensors_chunks(tensors, metadata)[1])


def tensors_of(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def tensor_bytes(module: nn.Module) -> int:
    """Bytes the module's state dict takes in a file (to check disk space before writing)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def read_safetensors(
    path: str | Path, expected_sha256: str | None = None, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str], str | None]:
    """Tensors, metadata and sha256 of a safetensors file, with one-line errors for bad files.

    With `expected_sha256` the file must hash to it; `verify=False` skips hashing (and the check)
    for huge trusted files and returns None as the hash."""
    path = Path(path)
    data = read_regular_file(path, MAX_SAFETENSORS_BYTES, ".safetensors file")
    digest = sha256_bytes(data) if verify else None
    if verify and expected_sha256 is not None:
        check_sha256(path, digest, expected_sha256)
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        metadata = parse_json(data[8 : 8 + header_len]).get("__metadata__") or {}
        if not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("metadata values must be strings")
        tensors = safetensors.torch.load(data)
    except Exception:
        raise DisbackError(f"{path}: not a valid safetensors file (truncated or corrupt)") from None
    return tensors, metadata, digest


def read_safetensors_header(path: str | Path) -> tuple[dict[str, str], dict[str, tuple]]:
    """The metadata and each tensor's shape of a safetensors file, from its header alone (the
    weights are not read): for checking a file against a network long before it is loaded."""
    bad = DisbackError(f"{path}: not a valid safetensors file (truncated or corrupt)")
    with open_regular_file(path, MAX_SAFETENSORS_BYTES, ".safetensors file") as f:
        head = f.read(8)
        if len(head) != 8:
            raise bad
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise bad
        raw = f.read(header_len)
    try:
        header = parse_json(raw)
        metadata = header.pop("__metadata__", None) or {}
        shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
        if not all(isinstance(v, str) for v in metadata.values()) or not all(
            type(n) is int for shape in shapes.values() for n in shape
        ):
            raise ValueError("not strings and integers")
    except (ValueError, TypeError, KeyError, AttributeError):
        raise bad from None
    return metadata, shapes


def check_weights(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Names, shapes and kinds of `tensors` equal to the network's, and every value finite, or a
    one-line explanation (a diverged or corrupt file must not sample NaN silently)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DisbackError(
            f"{source}: weights do not match the network "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
            f"e.g. {[name[:80] for name in unexpected[:2]]})"
        )
    for key, value in tensors.items():
        want = expected[key]
        if value.shape != want.shape:
            raise DisbackError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, the network expects "
                f"{tuple(want.shape)} (a file from another teacher?)"
            )
        if value.is_floating_point() != want.is_floating_point() or (
            not want.is_floating_point() and value.dtype != want.dtype
        ):
            raise DisbackError(f"{source}: tensor {key} is {value.dtype}, expected {want.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DisbackError(
                f"{source}: tensor {key} holds NaN or infinite values (a diverged or corrupt file)"
            )


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict load into an existing module, checked first by `check_weights`."""
    check_weights(module.state_dict(), tensors, source)
    module.load_state_dict(tensors, strict=True)


def check_finite(tensors: dict[str, torch.Tensor], source: object) -> None:
    """Refuse weights holding NaN or infinite values (a diverged or corrupt file)."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise DisbackError(
                f"{source}: tensor {key[:80]} holds NaN or infinite values (a diverged or "
                "corrupt file)"
            )


FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
EXACT_DTYPES = {
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.int8: "I8",
    torch.int16: "I16",
}


def check_tensor_table(path: Path, expected: dict[str, torch.Tensor], found: dict) -> None:
    """The file's tensors are exactly the network's, by name, shape and kind (a node file may
    hold floating tensors in a narrower float type): a missing or extra key is named."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        named = [f"missing {k[:80]!r}" for k in missing[:2]] + [
            f"unexpected {k[:80]!r}" for k in extra[:2]
        ]
        raise DisbackError(
            f"{path}: tensors do not match the network ({len(missing)} missing, {len(extra)} "
            f"unexpected: {', '.join(named)})"
        )
    for name, want in expected.items():
        entry = found[name]
        shape, dtype = tuple(entry.get_shape()), entry.get_dtype()
        if shape != tuple(want.shape):
            raise DisbackError(
                f"{path}: tensor {name} has shape {shape}, the network expects {tuple(want.shape)}"
            )
        ok = (
            dtype in FLOAT_DTYPES
            if want.is_floating_point()
            else dtype == EXACT_DTYPES.get(want.dtype)
        )
        if not ok:
            raise DisbackError(f"{path}: tensor {name} is {dtype}, expected {want.dtype}")
