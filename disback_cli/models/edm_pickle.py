"""Read NVIDIA EDM network pickles without executing anything they contain.

EDM pickles (`torch_utils.persistence`) embed the source code of every network class and normally
`exec` it while loading; `models.edm_unpickler` loads them into inert records instead, running
none of it. The record tree then gives the constructor kwargs (`_init_kwargs`) and a flat state
dict for our own networks, both bounded in size and nesting like the pickle itself.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from disback_cli.errors import DisbackError
from disback_cli.models.edm_unpickler import ModuleDictRecord, PersistentRecord, load_restricted
from disback_cli.models.networks import NetworkSpec
from disback_cli.store.fileio import read_regular_file, sha256_bytes

PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet"}
PRECOND_KWARGS = {
    "edm": ("sigma_min", "sigma_max", "sigma_data"),
    "vp": ("beta_d", "beta_min", "M", "epsilon_t"),
    "ve": ("sigma_min", "sigma_max"),
}

MAX_PICKLE_BYTES = 16 << 30  # the released EDM pickles are at most ~1.2 GB
MAX_KWARGS_DEPTH = 16
MAX_KWARGS_ITEMS = 10_000
MAX_MODULES = 100_000


@dataclass
class EDMNetwork:
    spec: NetworkSpec
    state_dict: dict[str, torch.Tensor]
    class_name: str  # EDMPrecond / VPPrecond / VEPrecond
    model_type: str  # SongUNet / DhariwalUNet
    init_kwargs: dict[str, Any]
    module_src_sha256: str  # of the embedded source we did not run
    sha256: str  # of the pickle file


def _plain(kwargs: dict) -> dict:
    """`_init_kwargs` as plain JSON-like values: strings, bools, integers below 2**31, floats
    other than NaN, and lists and dicts of them (tuples become lists), at most MAX_KWARGS_DEPTH
    deep and MAX_KWARGS_ITEMS visits in all (so a cycle or a shared-reference bomb ends too).
    Iterative, so depth cannot exhaust the stack; anything else is refused naming the key."""
    out: dict = {}
    stack: list[tuple[Any, Any, Any, str, int]] = [(kwargs, None, None, "", 0)]
    visits = 0
    while stack:
        value, parent, key, where, depth = stack.pop()
        visits += 1
        if visits > MAX_KWARGS_ITEMS or depth > MAX_KWARGS_DEPTH:
            raise DisbackError(f"_init_kwargs{where}: nested too deeply, cyclic or too large")
        if isinstance(value, (dict, list, tuple)):
            if isinstance(value, dict):
                copy: Any = {}
                items = list(value.items())
                if not all(isinstance(k, str) and len(k) <= 100 for k, _ in items):
                    raise DisbackError(f"_init_kwargs{where}: keys must be short strings")
            else:
                copy = [None] * len(value)
                items = list(enumerate(value))
            for k, item in items:
                stack.append((item, copy, k, f"{where}.{k}"[:200], depth + 1))
            value = copy
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            if isinstance(value, str) and len(value) > 1000:
                raise DisbackError(f"_init_kwargs{where}: string too long")
        elif isinstance(value, int):
            if abs(value) >= 2**31:
                raise DisbackError(f"_init_kwargs{where}: integer out of range")
        elif isinstance(value, float):
            if math.isnan(value):  # infinities pass: EDM writes sigma_max=inf (dropped below)
                raise DisbackError(f"_init_kwargs{where}: NaN is not a number")
        else:
            raise DisbackError(f"_init_kwargs{where}: unsupported {type(value).__name__}")
        if parent is not None:
            parent[key] = value
        else:
            out = value
    return out


def _flatten(root: PersistentRecord) -> dict[str, torch.Tensor]:
    """The state dict of a record tree (parameters and persistent buffers by dotted name),
    walked iteratively; every module appears once and every value is a tensor."""
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[Any, str]] = [(root, "")]
    seen: set[int] = set()
    while stack:
        record, prefix = stack.pop()
        if id(record) in seen or len(seen) > MAX_MODULES:
            raise DisbackError(f"module {prefix or 'network'} appears twice or too many modules")
        seen.add(id(record))
        state = record.state
        parts = [state.get(k) or {} for k in ("_parameters", "_buffers", "_modules")]
        skip = state.get("_non_persistent_buffers_set") or set()
        if not all(isinstance(p, dict) for p in parts) or not isinstance(skip, (set, list)):
            raise DisbackError(f"malformed module record at {prefix or 'network'}")
        params, buffers, children = parts
        for kind, table in (("parameter", params), ("buffer", buffers)):
            for name, tensor in table.items():
                where = f"{prefix}{name}"[:200]
                if not isinstance(name, str) or "." in name:
                    raise DisbackError(f"malformed {kind} name at {where}")
                if tensor is None or (kind == "buffer" and name in skip):
                    continue
                if not isinstance(tensor, torch.Tensor):
                    raise DisbackError(f"{kind} {where} is a {type(tensor).__name__}, not a tensor")
                out[where] = tensor.detach()
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(name, str) or not isinstance(
                child, (PersistentRecord, ModuleDictRecord)
            ):
                raise DisbackError(
                    f"unexpected object of type {type(child).__name__} at {prefix}{name}"[:200]
                )
            stack.append((child, f"{prefix}{name}."))
    return out


def _network_record(data: Any, path: Path) -> PersistentRecord:
    """The network: the `ema` entry of a training snapshot, or a bare network object."""
    if isinstance(data, dict):
        if "ema" not in data:
            keys = sorted(str(k)[:30] for k in list(data)[:6])
            raise DisbackError(f"{path}: pickle has no 'ema' network (keys: {keys})")
        data = data["ema"]
    if not isinstance(data, PersistentRecord):
        raise DisbackError(f"{path}: no EDM network found in the pickle ({type(data).__name__})")
    if data.class_name not in PRECOND_NAMES:
        raise DisbackError(
            f"{path}: unsupported network class {data.class_name!r} "
            f"(supported: {', '.join(PRECOND_NAMES)}; EDM2 and iDDPM pickles are not)"
        )
    return data


def _spec_from_kwargs(record: PersistentRecord, path: Path) -> tuple[NetworkSpec, dict, str]:
    if record.state.get("_init_args"):
        raise DisbackError(f"{path}: positional constructor arguments are not supported")
    raw = record.state.get("_init_kwargs") or {}
    if not isinstance(raw, dict):
        raise DisbackError(f"{path}: _init_kwargs is not a dict")
    kwargs = _plain(raw)
    precond = PRECOND_NAMES[record.class_name]
    arch_kwargs = dict(kwargs)
    model_type = arch_kwargs.pop("model_type", DEFAULT_MODEL[record.class_name])
    try:
        resolution = arch_kwargs.pop("img_resolution")
        channels = arch_kwargs.pop("img_channels")
    except KeyError as exc:
        raise DisbackError(f"{path}: _init_kwargs lack {exc.args[0]}") from None
    label_dim = arch_kwargs.pop("label_dim", 0)
    precond_kwargs = {"use_fp16": bool(arch_kwargs.pop("use_fp16", False))}
    for key in PRECOND_KWARGS[precond]:
        if key in arch_kwargs:
            value = arch_kwargs.pop(key)
            if not (key in ("sigma_min", "sigma_max") and value in (0, math.inf)):
                precond_kwargs[key] = value  # omit EDM's defaults, keeping the JSON finite
    try:
        spec = NetworkSpec(
            arch=model_type,
            arch_kwargs=arch_kwargs,
            precond=precond,
            precond_kwargs=precond_kwargs,
            data_shape=(channels, resolution, resolution),
            label_dim=label_dim,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        first = str(exc).splitlines()
        raise DisbackError(f"{path}: unusable network kwargs ({' '.join(first[:3])})") from None
    return spec, kwargs, model_type


def read_edm_pickle(path: str | Path) -> EDMNetwork:
    """Network spec and weights of an EDM pickle; raises DisbackError on anything unexpected."""
    path = Path(path)
    data = read_regular_file(path, MAX_PICKLE_BYTES, "network pickle")
    try:
        loaded = load_restricted(data)
    except DisbackError as exc:
        raise DisbackError(f"{path}: {exc}") from None
    except RecursionError:
        raise DisbackError(
            f"{path}: not a readable EDM network pickle (nested too deeply)"
        ) from None
    except Exception as exc:
        text = " ".join(str(exc).split())[:200]
        raise DisbackError(
            f"{path}: not a readable EDM network pickle ({type(exc).__name__}: {text})"
        ) from None
    record = _network_record(loaded, path)
    try:
        spec, kwargs, model_type = _spec_from_kwargs(record, path)
        state_dict = _flatten(record)
    except DisbackError as exc:
        message = str(exc)
        raise DisbackError(
            message if message.startswith(str(path)) else f"{path}: {message}"
        ) from None
    source_sha256 = hashlib.sha256(record.module_src.encode()).hexdigest()
    return EDMNetwork(
        spec, state_dict, record.class_name, model_type, kwargs, source_sha256, sha256_bytes(data)
    )
