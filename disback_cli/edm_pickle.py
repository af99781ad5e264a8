"""Read NVIDIA EDM network pickles without executing anything they contain.

EDM pickles (`torch_utils.persistence`) embed the source code of every network class and normally
`exec` it while loading. Here a restricted unpickler maps each persistent record to an inert
`PersistentRecord` (its `module_src` is kept as text, never run), rebuilds tensors with
weights-only-safe functions, and refuses every global outside a short allow-list. The record tree
then gives the constructor kwargs (`_init_kwargs`) and a flat state dict for our own networks.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disback_cli.errors import DisbackError
from disback_cli.fileio import sha256_bytes
from disback_cli.networks import NetworkSpec

PRECOND_NAMES = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet"}
PRECOND_KWARGS = {
    "edm": ("sigma_min", "sigma_max", "sigma_data"),
    "vp": ("beta_d", "beta_min", "M", "epsilon_t"),
    "ve": ("sigma_min", "sigma_max"),
}


class PersistentRecord:
    """Inert stand-in for a `torch_utils.persistence` object: its class name, source and state."""

    def __init__(self, meta: dict) -> None:
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise pickle.UnpicklingError("malformed persistent record")
        self.class_name = str(meta.get("class_name"))
        self.module_src = str(meta.get("module_src", ""))
        self.version = meta.get("version")
        self.state: dict = meta["state"]


class ModuleDictRecord:
    """Inert stand-in for `torch.nn.ModuleDict` (pickled as NEWOBJ + BUILD)."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


def _tensor_from_bytes(data: bytes) -> Any:
    """Replacement for `torch.storage._load_from_bytes`, which would allow arbitrary pickles."""
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_scalar() -> Any:
    core = getattr(np, "_core", None) or np.core
    return core.multiarray.scalar


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
    ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
    ("torch.storage", "_load_from_bytes"): _tensor_from_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar(),
    ("numpy.core.multiarray", "scalar"): _numpy_scalar(),
    ("dnnlib.util", "EasyDict"): dict,
    ("builtins", "set"): set,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DisbackError(
                f"refusing {module}.{name}: not on the allow-list for EDM network pickles"
            ) from None


@dataclass
class EDMNetwork:
    spec: NetworkSpec
    state_dict: dict[str, torch.Tensor]
    class_name: str  # EDMPrecond / VPPrecond / VEPrecond
    model_type: str  # SongUNet / DhariwalUNet
    init_kwargs: dict[str, Any]
    module_src_sha256: str  # of the embedded source we did not run
    sha256: str  # of the pickle file


def _plain(value: Any) -> Any:
    """numpy scalars and tuples inside `_init_kwargs` as plain JSON-able Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _flatten(record: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = record.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, param in (state.get("_parameters") or {}).items():
        if param is not None:
            out[prefix + name] = param.detach()
    for name, buffer in (state.get("_buffers") or {}).items():
        if buffer is not None and name not in skip:
            out[prefix + name] = buffer
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleDictRecord)):
            raise DisbackError(
                f"unexpected object of type {type(child).__name__} at {prefix}{name}"
            )
        _flatten(child, f"{prefix}{name}.", out)


def _network_record(data: Any, path: Path) -> PersistentRecord:
    """The network: the `ema` entry of a training snapshot, or a bare network object."""
    if isinstance(data, dict):
        if "ema" not in data:
            raise DisbackError(f"{path}: pickle has no 'ema' network (keys: {sorted(data)[:6]})")
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
    kwargs = _plain(dict(record.state.get("_init_kwargs") or {}))
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
    spec = NetworkSpec(
        arch=model_type, arch_kwargs=arch_kwargs, precond=precond, precond_kwargs=precond_kwargs,
        data_shape=(channels, resolution, resolution), label_dim=label_dim,
    )  # fmt: skip
    return spec, kwargs, model_type


def read_edm_pickle(path: str | Path) -> EDMNetwork:
    """Network spec and weights of an EDM pickle; raises DisbackError on anything unexpected."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DisbackError(f"{path}: no such file") from None
    except OSError as exc:
        raise DisbackError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(data)).load()
    except DisbackError as exc:
        raise DisbackError(f"{path}: {exc}") from None
    except Exception as exc:
        raise DisbackError(
            f"{path}: not a readable EDM network pickle ({type(exc).__name__}: {exc})"
        ) from None
    record = _network_record(loaded, path)
    spec, kwargs, model_type = _spec_from_kwargs(record, path)
    state_dict: dict[str, torch.Tensor] = {}
    _flatten(record, "", state_dict)
    source_sha256 = hashlib.sha256(record.module_src.encode()).hexdigest()
    return EDMNetwork(
        spec, state_dict, record.class_name, model_type, kwargs, source_sha256, sha256_bytes(data)
    )
