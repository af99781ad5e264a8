"""Fuzzing the three parsers of files that others write: manifests, safetensors headers and EDM
pickles. Whatever the bytes, the result is a validated object or a one-line DisbackError, never
another exception or a crash; and whatever a manifest says, the paths it can make disback use are
disback's own names inside the run directory.

Examples are derived deterministically (`derandomize`) and their number is fixed, so the suite's
time does not depend on luck; run with HYPOTHESIS_PROFILE=long for a deeper search.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import PurePosixPath

import pytest
from corpus import RING
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disback_cli.errors import DisbackError
from disback_cli.models.denoiser_files import load_denoiser
from disback_cli.models.edm_pickle import read_edm_pickle
from disback_cli.store.layout import BACKTRACK, TRAJECTORY
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest
from disback_cli.store.tensorfile import read_safetensors

settings.register_profile(
    "suite",
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=5000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

PATHS = [
    "nodes/node-001.safetensors",
    "../x",
    "/etc/passwd",
    "nodes/../../x",
    "",
    ".",
    "checkpoints/state-00000020.safetensors",
    "metrics.jsonl",
    "a\nb",
    "nodes/node-1.pt",
    "checkpoints/generator-00000020.safetensors",
    "state/record-00000030.safetensors",
]
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(PATHS),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """(path, leaf) of every leaf of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))
    else:
        yield prefix, value


def _replace(value, path, new):
    if not path:
        return new
    head, *rest = path
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replace(value[head], rest, new)
    return copy


@pytest.fixture(scope="module")
def manifests(template) -> dict:
    return {
        "trajectory": json.loads((template / "t" / "manifest.json").read_text()),
        "backtrack": json.loads((template / "t/backtrack/default/manifest.json").read_text()),
    }


def _confined(manifest, layout) -> None:
    """Every file a valid manifest names is one disback writes, inside the run directory."""
    files = []
    if isinstance(manifest, TrajectoryManifest):
        files += [n.file for n in manifest.nodes if n.file]
    else:
        files += [r.file for r in (manifest.generator, manifest.generator_ema) if r]
        files.append(manifest.metrics)
    files += [manifest.state.file] if manifest.state else []
    for file in files:
        assert layout.owns(file) and ".." not in PurePosixPath(file).parts, file


@given(data=st.data())
def test_any_manifest_edit_is_validated_or_refused_in_one_line(manifests, tmp_path, data):
    kind = data.draw(st.sampled_from(["trajectory", "backtrack"]))
    manifest = manifests[kind]
    leaves = list(_paths(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        where, _ = data.draw(st.sampled_from(leaves))
        manifest = _replace(manifest, where, data.draw(json_values))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    model, layout = (
        (TrajectoryManifest, TRAJECTORY) if kind == "trajectory" else (BacktrackManifest, BACKTRACK)
    )
    try:
        parsed = read_manifest(tmp_path, model)
    except DisbackError as exc:
        assert "\n" not in str(exc)
        return
    _confined(parsed, layout)


@given(data=st.data())
def test_any_manifest_bytes_are_validated_or_refused_in_one_line(manifests, tmp_path, data):
    text = json.dumps(manifests[data.draw(st.sampled_from(["trajectory", "backtrack"]))])
    start = data.draw(st.integers(0, len(text)))
    cut = data.draw(st.integers(start, min(len(text), start + 40)))
    text = text[:start] + data.draw(st.text(max_size=40)) + text[cut:]
    (tmp_path / "manifest.json").write_text(text, errors="surrogatepass")
    for model in (TrajectoryManifest, BacktrackManifest):
        try:
            read_manifest(tmp_path, model)
        except DisbackError as exc:
            assert "\n" not in str(exc)


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "X9", 7]


@pytest.fixture(scope="module")
def ring_file() -> tuple[dict, dict]:
    tensors, metadata, _ = read_safetensors(RING)
    return {k: (list(v.shape), v.numpy().tobytes()) for k, v in tensors.items()}, metadata


@given(data=st.data())
def test_any_safetensors_header_is_loaded_or_refused_in_one_line(ring_file, tmp_path, data):
    blobs, metadata = ring_file
    header: dict = {"__metadata__": dict(metadata)}
    chunks, offset = [], 0
    for name in sorted(blobs):
        shape, blob = blobs[name]
        header[name] = {
            "dtype": "F32",
            "shape": shape,
            "data_offsets": [offset, offset + len(blob)],
        }
        chunks.append(blob)
        offset += len(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(["network", "info", "network", "info", "tensors"]))
        if target == "tensors":  # the table of tensors: names, dtypes, shapes, offsets
            where, _ = data.draw(st.sampled_from(list(_paths(header))))
            new = (
                data.draw(st.sampled_from(DTYPES))
                if where[-1] == "dtype"
                else data.draw(json_values)
            )
            header = _replace(header, where, new)
        else:  # the JSON inside the metadata: the network spec or the provenance
            inner = json.loads(header["__metadata__"].get(target, "{}"))
            leaves = list(_paths(inner)) or [((), None)]
            where, _ = data.draw(st.sampled_from(leaves))
            header["__metadata__"][target] = json.dumps(
                _replace(inner, where, data.draw(json_values))
            )
    text = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    try:
        load_denoiser(path)
    except DisbackError as exc:
        assert "\n" not in str(exc)


# Pickle programs over the allow-listed globals (and a few refused ones): what a hostile EDM
# pickle can express. Each instruction is (opcode bytes, stack effect) in a tiny grammar.
GLOBALS = [
    ("torch_utils.persistence", "_reconstruct_persistent_obj"),
    ("torch.nn.modules.container", "ModuleDict"),
    ("torch.storage", "_load_from_bytes"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("dnnlib.util", "EasyDict"),
    ("builtins", "set"),
    ("torch", "load"),
    ("os", "system"),
]


def _unicode(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


@st.composite
def pickle_programs(draw) -> bytes:
    dtype_names = st.sampled_from(["f8", "f4", "i8", "O8", "O", "V8", "<f8", "b1", "U4", "S8"])
    atoms = st.one_of(
        st.integers(-(2**40), 2**40).map(
            lambda i: (
                b"J" + struct.pack("<i", i % 2**31)
                if -(2**31) <= i < 2**31
                else b"\x8a\x08" + struct.pack("<q", i)
            )
        ),
        st.binary(max_size=24).map(lambda b: b"C" + bytes([len(b)]) + b),
        st.text(max_size=12).map(_unicode),
        dtype_names.map(_unicode),
        st.just(b"N"),
        st.just(b"\x88"),
        st.just(b"\x89"),
        st.just(b"G" + struct.pack(">d", 1.5)),
    )
    operations = st.one_of(
        atoms,
        st.sampled_from(GLOBALS).map(lambda g: f"c{g[0]}\n{g[1]}\n".encode()),
        st.sampled_from(
            [
                b"]",
                b"}",
                b")",
                b"(",
                b"e",
                b"u",
                b"t",
                b"R",
                b"b",
                b"\x81",
                b"\x85",
                b"\x86",
                b"\x87",
                b"a",
                b"s",
                b"0",
                b"2",
                b"\x94",
            ]
        ),
        st.integers(0, 5).map(lambda i: b"h" + bytes([i])),
    )
    body = b"".join(draw(st.lists(operations, max_size=40)))
    ending = draw(st.sampled_from([b".", b"}(Vema\nX\x00\x00\x00\x00u.", b""]))
    return b"\x80\x04" + body + ending


@given(program=pickle_programs())
def test_any_pickle_program_is_read_or_refused_in_one_line(tmp_path, program):
    path = tmp_path / "f.pkl"
    path.write_bytes(program)
    try:
        read_edm_pickle(path)
    except DisbackError as exc:
        assert "\n" not in str(exc)


def test_the_pickle_grammar_reaches_the_allow_listed_constructors(tmp_path):
    """The fuzzer is only worth something if its programs get past the opcode level: this fixed
    program builds an OrderedDict and a numpy scalar through the allow-list, and must reach the
    network check rather than fail as a malformed pickle."""
    program = (
        b"\x80\x04}("
        + _unicode("a")
        + b"ccollections\nOrderedDict\n)R"
        + _unicode("b")
        + b"cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\n"
        + _unicode("f8")
        + b"\x89\x88\x87R(K\x03"
        + _unicode("<")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"C\x08"
        + struct.pack("<d", 1.5)
        + b"\x86Ru."
    )
    assert pickle.loads(program)["b"] == 1.5  # what Python itself makes of it
    path = tmp_path / "f.pkl"
    path.write_bytes(program)
    with pytest.raises(DisbackError, match="no 'ema' network"):
        read_edm_pickle(path)
