"""A restricted unpickler for NVIDIA EDM network pickles: it loads them without executing anything
they contain.

EDM pickles (`torch_utils.persistence`) embed the source code of every network class and normally
`exec` it while loading. Here each persistent record is mapped to an inert `PersistentRecord` (its
`module_src` is kept as text, never run) and every global outside a short allow-list is refused.
What the allow-list admits is rebuilt by our own code, never by the library function the pickle
names: numpy scalars from a fixed set of numeric dtypes, tensor storages by our own parser of
torch's storage format, tensors as views checked against their storage. Opcodes, nesting and
tensor bytes are bounded before and while loading, so a file of a few hundred bytes can neither
corrupt memory nor exhaust it.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import struct
from typing import Any

import numpy as np
import torch

from disback_cli.errors import DisbackError

MAX_OPCODES = 10_000_000  # a 56M-parameter CIFAR-10 pickle has about 45 000
MAX_PICKLE_DEPTH = 1000  # real EDM pickles nest about 20 deep
MAX_TENSOR_DIMS = 8
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's non-zip serialisation
LEGACY_PROTOCOL = 1001

NUMPY_DTYPES = ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
NUMPY_STATES = {name: np.dtype(name).__reduce__()[2] for name in NUMPY_DTYPES}
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class PersistentRecord:
    """Inert stand-in for a `torch_utils.persistence` object: its class name, source and state."""

    def __init__(self, meta: dict) -> None:
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
            raise pickle.UnpicklingError("malformed persistent record")
        self.class_name = str(meta.get("class_name"))[:100]
        source = meta.get("module_src", "")
        self.module_src = source if isinstance(source, str) else ""
        self.state: dict = meta["state"]


class ModuleDictRecord:
    """Inert stand-in for `torch.nn.ModuleDict` (pickled as NEWOBJ + BUILD)."""

    def __setstate__(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError("malformed ModuleDict")
        self.state = state


class NumpyDtype:
    """A numeric numpy dtype named by a pickle, inert: numpy itself never sees the pickle's state
    (a dtype with attacker-chosen state let numpy read bytes as an object pointer)."""

    def __init__(self, name: object = None, align: object = False, copy: object = True) -> None:
        if name not in NUMPY_DTYPES or align is not False or copy is not True:
            raise pickle.UnpicklingError(f"numpy dtype {name!r:.20} is not a plain number type")
        self.name = name

    def __setstate__(self, state: object) -> None:
        if state != NUMPY_STATES[self.name]:
            raise pickle.UnpicklingError(f"numpy dtype {self.name} with unusual state")


def _numpy_scalar(dtype: object, data: object = None) -> int | float | bool:
    """A numpy scalar of a plain number type, as the Python number it holds."""
    if not isinstance(dtype, NumpyDtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar of an unsupported kind")
    if len(data) != np.dtype(dtype.name).itemsize:
        raise pickle.UnpicklingError("numpy scalar of the wrong size")
    return np.frombuffer(data, dtype=dtype.name)[0].item()


class Storage:
    """A tensor storage read from the pickle: a flat CPU tensor over its own bytes."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _NoGlobals(pickle.Unpickler):
    """For the plain parts of a storage record (magic number, version, system info, keys)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a tensor storage")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("unexpected persistent id in a tensor storage")


class _StorageRecord(_NoGlobals):
    """The storage's own record: only typed-storage classes, one persistent id per storage."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.declared: dict[str, tuple[torch.dtype, int]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (
            isinstance(pid, tuple)
            and len(pid) in (5, 6)
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and len(pid[2]) < 100
            and isinstance(pid[3], str)
            and len(pid[3]) < 50
            and type(pid[4]) is int
            and pid[4] >= 0
            and (len(pid) == 5 or pid[5] is None)
        ):
            raise pickle.UnpicklingError("malformed storage record")
        self.declared[pid[2]] = (pid[1].dtype, pid[4])
        return pid[2]


def _read_storage(data: bytes) -> Storage:
    """Parse the bytes torch pickles a storage as (the legacy `torch.save` format: magic number,
    protocol version, system info, the storage's record, its key, then per key an int64 element
    count and the raw little-endian elements), checking every declared size against the bytes."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("tensor storage is not bytes")
    stream = io.BytesIO(data)
    if _NoGlobals(stream).load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("tensor storage in an unsupported format")
    if _NoGlobals(stream).load() != LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("tensor storage of an unsupported protocol")
    info = _NoGlobals(stream).load()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise pickle.UnpicklingError("tensor storage from a big-endian machine")
    record = _StorageRecord(stream)
    key = record.load()
    keys = _NoGlobals(stream).load()
    if keys != [key] or list(record.declared) != [key]:
        raise pickle.UnpicklingError("tensor storage with other than one storage")
    dtype, numel = record.declared[key]
    header = stream.read(8)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if len(header) != 8 or struct.unpack("<q", header)[0] != numel:
        raise pickle.UnpicklingError("tensor storage size does not match its record")
    if len(data) - stream.tell() != nbytes:
        raise pickle.UnpicklingError("tensor storage size does not match its bytes")
    raw = bytearray(data[stream.tell() :])
    return Storage(torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype))


def _check_hooks(hooks: object) -> None:
    if hooks is not None and not (isinstance(hooks, collections.OrderedDict) and not hooks):
        raise pickle.UnpicklingError("tensor with backward hooks")


class _RestrictedUnpickler(pickle.Unpickler):
    """Allow-listed globals only, each mapped to an inert stand-in or our own constructor. Tracks
    the bytes of the tensors it builds: together they may not exceed the file."""

    def __init__(self, file: io.BytesIO, budget: int) -> None:
        super().__init__(file)
        self.budget = budget
        self.allowed: dict[tuple[str, str], Any] = {
            ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
            ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
            ("torch.storage", "_load_from_bytes"): _read_storage,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("numpy", "dtype"): NumpyDtype,
            ("numpy._core.multiarray", "scalar"): _numpy_scalar,
            ("numpy.core.multiarray", "scalar"): _numpy_scalar,
            ("dnnlib.util", "EasyDict"): dict,
            ("builtins", "set"): set,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DisbackError(
                f"refusing {module}.{name}: not on the allow-list for EDM network pickles"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("unexpected persistent id")

    def _rebuild_tensor(
        self,
        storage: object,
        offset: object,
        size: object,
        stride: object,
        requires_grad: object = False,
        hooks: object = None,
        metadata: object = None,
    ) -> torch.Tensor:
        """A view of `storage` that stays inside it and is no larger than it (a stride-0 view of
        a few bytes could otherwise ask for terabytes)."""
        sizes = size if isinstance(size, tuple) else ()
        strides = stride if isinstance(stride, tuple) else ()
        integers = (offset, *sizes, *strides)
        if not (
            isinstance(storage, Storage)
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(sizes) == len(strides) <= MAX_TENSOR_DIMS
            and all(type(v) is int and v >= 0 for v in integers)
        ):
            raise pickle.UnpicklingError("malformed tensor")
        _check_hooks(hooks)
        if metadata not in (None, {}):
            raise pickle.UnpicklingError("tensor with metadata")
        flat, numel = storage.flat, math.prod(sizes)
        last = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
        if numel and (numel > flat.numel() or last >= flat.numel()):
            raise pickle.UnpicklingError("tensor larger than its storage")
        self.budget -= numel * flat.element_size()
        if self.budget < 0:
            raise pickle.UnpicklingError("tensors larger than the file that holds them")
        if not numel:
            return flat.new_empty(sizes)
        view = flat.as_strided(sizes, strides, offset)
        return view if view.is_contiguous() else view.clone()

    def _rebuild_parameter(
        self,
        data: object,
        requires_grad: object = False,
        hooks: object = None,
        state: object = None,
    ) -> torch.Tensor:
        """The parameter's tensor alone (attributes in `state` are not needed and not set)."""
        if not isinstance(data, torch.Tensor) or not (state is None or isinstance(state, dict)):
            raise pickle.UnpicklingError("malformed parameter")
        _check_hooks(hooks)
        return data


MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}


def _scan(data: bytes) -> None:
    """Walk the opcodes without executing any, tracking how deeply each value on the pickle's
    stack is nested, and refuse a malformed stream, more opcodes than any network needs, or
    nesting beyond MAX_PICKLE_DEPTH: Python hashes nested tuples recursively in C, so a
    million-deep tuple used as a dict key would overflow the stack while unpickling."""
    stack: list[int] = []  # nesting depth of each value on the pickle's stack
    marks: list[int] = []
    memo: dict[Any, int] = {}
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if count >= MAX_OPCODES:
                raise DisbackError(f"more than {MAX_OPCODES:,} pickle opcodes")
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
            elif name in MEMO_PUTS or name == "MEMOIZE":
                memo[arg if name in MEMO_PUTS else len(memo)] = stack[-1]
            elif name in MEMO_GETS:
                stack.append(memo.get(arg, 0))
            elif name == "DUP":
                stack.append(stack[-1])
            else:
                if pickletools.markobject in op.stack_before:
                    start = marks.pop()
                    popped, stack[start:] = stack[start:], []
                else:
                    size = len(op.stack_before)
                    popped, stack[len(stack) - size :] = stack[len(stack) - size :], []
                if name in MUTATORS:  # the container below the items gains their depth
                    target = stack.pop() if pickletools.markobject in op.stack_before else None
                    if target is None:
                        target, popped = popped[0], popped[1:]
                    stack.append(max([target, *(d + 1 for d in popped)]))
                else:
                    made = max(popped) + 1 if popped else int(name.startswith("EMPTY_"))
                    stack.extend(made for _ in op.stack_after)
            if stack and stack[-1] > MAX_PICKLE_DEPTH:
                raise DisbackError(f"values nested more than {MAX_PICKLE_DEPTH} deep")
    except (IndexError, ValueError) as exc:  # underflow or a malformed opcode stream
        raise DisbackError(f"not a readable EDM network pickle ({exc})") from None


def load_restricted(data: bytes) -> Any:
    """The objects of an EDM pickle, its opcodes scanned before anything is built (see `_scan`)
    and its tensors together no larger than the file."""
    _scan(data)
    return _RestrictedUnpickler(io.BytesIO(data), budget=len(data)).load()
