"""The EDM pickle reader against hand-made hostile pickles, one per kind of abuse: each is refused
in one line naming what is wrong, before it can allocate, corrupt or run anything. The CLI-level
cases (and the numpy exploit that crashed the old reader) are in the bad-input corpus."""

from __future__ import annotations

import collections
import io
import pickle
import shlex
import struct

import numpy as np
import pytest
import torch
from edm_fixtures import edm_pickle_bytes, tiny_network, write_edm_snapshot

from disback_cli.errors import DisbackError
from disback_cli.models import edm_unpickler
from disback_cli.models.edm_pickle import read_edm_pickle


def legacy_storage(values: torch.Tensor) -> bytes:
    """What torch pickles a storage as: the legacy (non-zip) `torch.save` of it."""
    typed = torch.storage.TypedStorage(
        wrap_storage=values.untyped_storage(), dtype=values.dtype, _internal=True
    )
    buffer = io.BytesIO()
    torch.save(typed, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


class Call:
    """Pickles as `function(*args)`: a hand-made REDUCE."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


def storage(data: bytes) -> Call:
    return Call(torch.storage._load_from_bytes, data)


def tensor(store, size, stride, offset=0, hooks=None) -> Call:
    return Call(
        torch._utils._rebuild_tensor_v2,
        store,
        offset,
        size,
        stride,
        False,
        collections.OrderedDict() if hooks is None else hooks,
    )


def refused(tmp_path, payload, match: str) -> str:
    path = tmp_path / "x.pkl"
    path.write_bytes(payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=4))
    with pytest.raises(DisbackError, match=match) as info:
        read_edm_pickle(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_valid_storage_and_view_load_as_the_same_tensor(tmp_path):
    values = torch.arange(12, dtype=torch.float32)
    path = tmp_path / "ok.pkl"
    path.write_bytes(
        pickle.dumps({"ema": tensor(storage(legacy_storage(values)), (3, 4), (4, 1))}, protocol=4)
    )
    with pytest.raises(DisbackError, match="no EDM network found in the pickle \\(Tensor\\)"):
        read_edm_pickle(path)  # the tensor itself was rebuilt; only the network is missing


def test_a_storage_that_declares_more_elements_than_it_holds_is_refused(tmp_path):
    data = bytearray(legacy_storage(torch.zeros(4)))
    at = data.rindex(b"\x04\x00\x00\x00\x00\x00\x00\x00")  # the element count before the data
    data[at : at + 8] = (10**12).to_bytes(8, "little")
    refused(tmp_path, {"ema": storage(bytes(data))}, "size does not match its record")


def test_a_zip_format_storage_is_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save(torch.zeros(4).untyped_storage(), buffer)  # the zip format, torch.load's default
    refused(tmp_path, {"ema": storage(buffer.getvalue())}, "not a readable EDM network pickle")


def test_a_view_beyond_its_storage_or_larger_than_it_is_refused(tmp_path):
    store = storage(legacy_storage(torch.zeros(4)))
    refused(tmp_path, {"ema": tensor(store, (1 << 40,), (0,))}, "tensor larger than its storage")
    refused(tmp_path, {"ema": tensor(store, (4,), (1,), offset=1)}, "larger than its storage")
    refused(tmp_path, {"ema": tensor(store, (2,), (-1,))}, "malformed tensor")


def test_many_views_of_one_storage_may_not_add_up_to_more_than_the_file(tmp_path):
    store = storage(legacy_storage(torch.zeros(256)))
    views = [tensor(store, (256,), (1,)) for _ in range(100)]
    refused(tmp_path, {"ema": views}, "tensors larger than the file that holds them")


def test_backward_hooks_are_refused(tmp_path):
    store = storage(legacy_storage(torch.zeros(4)))
    hooks = collections.OrderedDict(a=Call(collections.OrderedDict))
    refused(tmp_path, {"ema": tensor(store, (4,), (1,), hooks=hooks)}, "backward hooks")


def test_too_many_opcodes_are_refused_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(edm_unpickler, "MAX_OPCODES", 50)
    refused(tmp_path, {"ema": list(range(100))}, "more than 50 pickle opcodes")


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (2**40, "integer out of range"),
        (float("nan"), "NaN is not a number"),
        (b"bytes", "unsupported bytes"),
        ({1: 2}, "keys must be short strings"),
    ],
)
def test_kwargs_must_be_plain_bounded_values(tmp_path, value, match):
    net, kwargs = tiny_network("ddpmpp", "edm")
    refused(
        tmp_path,
        edm_pickle_bytes(net, net, {**kwargs, "extra": value}),
        f"_init_kwargs.extra: {match}",
    )


def test_a_parameter_that_is_not_a_tensor_is_named(tmp_path):
    net, kwargs = tiny_network("ddpmpp", "edm")
    net.model.map_noise.register_buffer("freqs", None)
    net.model.map_noise._buffers["freqs"] = "not a tensor"
    message = refused(tmp_path, edm_pickle_bytes(net, net, kwargs), "not a tensor")
    assert "model.map_noise.freqs" in message


def test_numpy_scalars_in_kwargs_load_as_plain_numbers(tmp_path):
    net, kwargs = tiny_network("ddpmpp", "edm")
    kwargs = {**kwargs, "dropout": np.float64(0.1), "model_channels": np.int64(16)}
    path = write_edm_snapshot(tmp_path / "n.pkl", net, kwargs)
    loaded = read_edm_pickle(path)
    assert type(loaded.init_kwargs["dropout"]) is float and loaded.init_kwargs["dropout"] == 0.1
    assert type(loaded.init_kwargs["model_channels"]) is int
    assert loaded.spec.arch_kwargs["model_channels"] == 16


@pytest.mark.parametrize(
    ("args", "state"),
    [
        (("O8", False, True), None),
        (("f8", True, True), None),
        (("f8", False, True), (3, ">", None, None, None, -1, -1, 0)),
    ],
)
def test_numpy_dtypes_other_than_plain_numbers_are_refused(tmp_path, args, state):
    class Dtype:
        def __reduce__(self):
            return (np.dtype, args) if state is None else (np.dtype, args, state)

    core = getattr(np, "_core", None) or np.core
    refused(tmp_path, {"ema": Call(core.multiarray.scalar, Dtype(), b"\0" * 8)}, "numpy dtype")


# Hand-written hostile pickles (protocol 4, where the unpickler resolves dotted names such as
# "os.system" inside a module). Each would run `touch MARKER` under an ordinary unpickler, or
# under one that looks up anything from a `torch` module outside the allow-list.


def text(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def named(module: str, name: str, opcode: str) -> bytes:
    """Push module.name by the GLOBAL or the STACK_GLOBAL opcode."""
    if opcode == "GLOBAL":
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    return text(module) + text(name) + b"\x93"


def called_with(argument: bytes) -> bytes:
    """Call what is on the stack with one argument (pushed by `argument`): TUPLE1, REDUCE."""
    return argument + b"\x85R"


def hostile_pickle(module: str, name: str, marker, opcode: str = "STACK_GLOBAL") -> bytes:
    """A pickle whose first global is module.name, called so as to create `marker`."""
    shell = f"touch {shlex.quote(str(marker))}"
    if (module, name) == ("torch._utils", "_import_dotted_name"):  # -> os.system -> shell
        call = called_with(text("os.system")) + called_with(text(shell))
    elif name.endswith("_load_from_bytes"):  # torch.load of a nested, unrestricted pickle
        inner = b"\x80\x04" + named("os", "system", "STACK_GLOBAL") + called_with(text(shell))
        call = called_with(b"B" + struct.pack("<I", len(inner) + 1) + inner + b".")
    elif module == "builtins":  # eval / exec of Python source
        call = called_with(text(f"__import__('os').system({shell!r})"))
    else:
        call = called_with(text(shell))
    return b"\x80\x04" + named(module, name, opcode) + call + b"."


HOSTILE_GLOBALS = [
    ("torch", "os.system"),  # os reached through the torch module
    ("torch", "load"),
    ("torch", "storage._load_from_bytes"),  # torch's own, which runs torch.load, not ours
    ("torch", "_utils._rebuild_tensor_v2"),  # an allowed function under another name
    ("torch.hub", "load"),
    ("torch._utils", "_import_dotted_name"),
    ("torch.serialization", "load"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("os", "system"),
    ("posix", "system"),
]


@pytest.mark.parametrize("opcode", ["GLOBAL", "STACK_GLOBAL"])
@pytest.mark.parametrize(("module", "name"), HOSTILE_GLOBALS)
def test_globals_off_the_allow_list_are_refused_before_they_run(tmp_path, module, name, opcode):
    """No lookup outside the allow-list, in torch's own modules included: one line naming the
    global, and the command the pickle carries never runs."""
    marker, path = tmp_path / "PWNED", tmp_path / "hostile.pkl"
    path.write_bytes(hostile_pickle(module, name, marker, opcode))
    with pytest.raises(DisbackError) as info:
        read_edm_pickle(path)
    assert not marker.exists(), "the command in the pickle ran"
    message = str(info.value)
    assert f"refusing {module}.{name}: not on the allow-list" in message and "\n" not in message


def test_the_file_budget_counts_bytes_not_elements(tmp_path):
    """Two float32 views of a 1024-element storage: 2048 elements fit in the ~5 KB file, their
    8 KB do not."""
    store = storage(legacy_storage(torch.zeros(1024)))
    payload = pickle.dumps({"ema": [tensor(store, (1024,), (1,)) for _ in range(2)]}, protocol=4)
    assert 2048 < len(payload) < 8192
    refused(tmp_path, payload, "tensors larger than the file that holds them")


def test_a_storage_with_bytes_beyond_its_elements_is_refused(tmp_path):
    data = legacy_storage(torch.zeros(4)) + b"\x00" * 4
    refused(tmp_path, {"ema": storage(data)}, "size does not match its bytes")


def test_a_module_that_appears_twice_in_the_network_is_refused(tmp_path):
    net, kwargs = tiny_network("ddpmpp", "vp")
    net.model.shared = net.model.map_noise  # the same record under a second name
    path = tmp_path / "shared.pkl"
    write_edm_snapshot(path, net, kwargs)
    with pytest.raises(DisbackError, match="appears twice"):
        read_edm_pickle(path)
