"""Files that someone else wrote, on purpose or by accident: shared trajectories and runs whose
manifests point outside, symbolic links, folders holding other people's files, hostile pickles,
absurd numbers, non-finite weights, half-written sample folders. Each case is refused in one line,
and nothing anywhere in the world changes, `outside/` included (see `corpus`)."""

from __future__ import annotations

import collections
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from corpus import (
    EXTEND,
    RECORD_AGAIN,
    RUN,
    Case,
    T,
    World,
    check_ids,
    edit_json,
    generator_file,
    rehash,
    rewrite_denoiser,
    ring_metadata,
    ring_tensors,
    run_case,
    set_in,
    teacher_file,
    write_and,
)
from edm_fixtures import edm_pickle_bytes, tiny_network
from test_bad_inputs import CASES as BASIC_CASES
from test_fid import images_like, write_folder
from test_unpickler import hostile_pickle

from disback_cli.store.images import encode_png, png_name
from disback_cli.store.samples import write_record

TRAJ = T / "manifest.json"
RUN_MANIFEST = RUN / "manifest.json"
VICTIM = "outside/victim.txt"


def absolute(w: World, relative: str) -> str:
    return str(w / relative)


def recording(w: World) -> None:
    """`t` as a recording killed after node 1 (so `record` resumes it and cleans up)."""
    edit_json(w / TRAJ, lambda m: m.update(status="recording", nodes=m["nodes"][:2]))


def link(w: World, where: str, target: str) -> None:
    """Replace `where` (file or folder) by a symbolic link to `target`."""
    path = w / where
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    path.symlink_to(w / target)


def outside_folder_like(w: World, files: list[str]) -> str:
    """A folder outside any run holding files with disback's own names (which a cleanup through a
    link would delete)."""
    for name in files:
        (w / "outside" / "mine" / name).parent.mkdir(parents=True, exist_ok=True)
        (w / "outside" / "mine" / name).write_text("not disback's\n")
    return "outside/mine"


def huge_tensor_pickle(w: World) -> list[str]:
    """A tensor view that asks for 2**40 elements of a one-element storage (stride 0)."""

    class Huge:
        def __reduce__(self):
            storage = torch.zeros(1).untyped_storage()
            typed = torch.storage.TypedStorage(
                wrap_storage=storage, dtype=torch.float32, _internal=True
            )
            return (
                torch._utils._rebuild_tensor_v2,
                (typed, 0, (1 << 40,), (0,), False, collections.OrderedDict()),
            )

    return write_and(
        w / "huge.pkl",
        pickle.dumps({"ema": Huge()}, protocol=4),
        ["teacher", "inspect", "huge.pkl"],
    )


def numpy_scalar_pickle(w: World, command: list[str]) -> list[str]:
    """evil.pkl: an EDM network whose `_init_kwargs` hold a numpy scalar of a dtype that BUILD
    turned into one with an object field and no object flag, over 8 attacker bytes. Reading the
    value made numpy follow 0x4141414141414141 as a pointer: SIGSEGV before the fix (checked by
    hand against the old unpickler: exit -11). Returns `command`."""

    class ObjectFieldDtype:
        def __reduce__(self):
            fields = {"a": (np.dtype(object), 0)}
            return (np.dtype, ("V8", False, True), (3, "|", None, ("a",), fields, 8, 1, 0))

    class Scalar:
        def __reduce__(self):
            core = getattr(np, "_core", None) or np.core
            return (core.multiarray.scalar, (ObjectFieldDtype(), b"\x41" * 8))

    net, kwargs = tiny_network("ddpmpp", "edm")
    data = edm_pickle_bytes(net, net, {**kwargs, "dropout": Scalar()})
    return write_and(w / "evil.pkl", data, command)


def named_global_pickle(w: World, module: str, name: str) -> list[str]:
    """A pickle that calls MODULE.NAME (e.g. torch + os.system) with a shell command."""
    marker = w / "PWNED"
    body = f"c{module}\n{name}\n(Vtouch {marker}\ntR.".encode()
    return write_and(w / "g.pkl", b"\x80\x02" + body, ["teacher", "inspect", "g.pkl"])


def stack_global_pickle(w: World, module: str, name: str) -> list[str]:
    """A protocol-4 pickle naming MODULE.NAME by STACK_GLOBAL, where dotted names resolve (so
    torch + os.system is os.system), called so as to create PWNED (see `hostile_pickle`)."""
    return write_and(
        w / "s.pkl", hostile_pickle(module, name, w / "PWNED"), ["teacher", "inspect", "s.pkl"]
    )


def deep_pickle(w: World) -> list[str]:
    """_init_kwargs holding lists nested 100 000 deep (Python's own pickler cannot even write
    that: the opcodes are spliced in where a marker string was)."""
    net, kwargs = tiny_network("ddpmpp", "edm")
    data = edm_pickle_bytes(net, net, {**kwargs, "channel_mult_emb": "DEEP"}, protocol=3)
    marker = b"X" + struct.pack("<I", 4) + b"DEEP"
    assert data.count(marker) == 1
    nested = b"]" * 100_000 + b"a" * 99_999  # each APPEND puts a list into the one below it
    return write_and(
        w / "deep.pkl", data.replace(marker, nested), ["teacher", "inspect", "deep.pkl"]
    )


def cyclic_pickle(w: World) -> list[str]:
    net, kwargs = tiny_network("ddpmpp", "edm")
    loop: list = []
    loop.append(loop)
    data = edm_pickle_bytes(net, net, {**kwargs, "attn_resolutions": loop})
    return write_and(w / "loop.pkl", data, ["teacher", "inspect", "loop.pkl"])


def fifo(w: World, name: str, command: list[str]) -> list[str]:
    os.mkfifo(w / name)
    return command


def nan_weights(w: World) -> list[str]:
    tensors = ring_tensors()
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    return [
        "record",
        "--teacher",
        teacher_file(w / "nan.safetensors", ring_metadata(), tensors),
        "--out",
        "o",
    ]


def nan_generator(w: World) -> list[str]:
    path = generator_file(w)
    tensors = ring_tensors()
    tensors = {k: v.clone() for k, v in tensors.items()}
    key = sorted(tensors)[-1]
    tensors[key][0] = float("inf")
    rewrite_denoiser(path, tensors)
    rehash(w / RUN_MANIFEST, ["generator_ema", "sha256"], path)
    return ["sample", "-T", "t", "-n", "5", "-o", "x.npz"]


def overflowing_generator(w: World) -> list[str]:
    """Finite weights so large that the one-step output overflows float32."""
    path = generator_file(w)
    tensors = {k: v.clone() for k, v in ring_tensors().items()}
    for key in tensors:
        if key.endswith("weight"):
            tensors[key].fill_(1e30)
    rewrite_denoiser(path, tensors)
    rehash(w / RUN_MANIFEST, ["generator_ema", "sha256"], path)
    return ["sample", "-T", "t", "-n", "5", "-o", "x.npz"]


def generator_info(w: World, info: str) -> list[str]:
    path = generator_file(w)
    rewrite_denoiser(path, info=info)
    rehash(w / RUN_MANIFEST, ["generator_ema", "sha256"], path)
    return ["sample", "-T", "t", "-n", "5", "-o", "x.npz"]


def spec_file(w: World, **change) -> list[str]:
    network = json.loads(ring_metadata()["network"])
    for key, value in change.items():
        target = network
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    metadata = ring_metadata(network=json.dumps(network))
    return ["teacher", "inspect", teacher_file(w / "spec.safetensors", metadata, ring_tensors())]


def foreign_node(w: World, tensors=None, **metadata: str) -> list[str]:
    """Path node 1 of another network, in a trajectory that vouches for it: refused when the
    targets open, before the run writes anything, not at node 1's switch."""
    path = w / T / "nodes" / "node-001.safetensors"
    rewrite_denoiser(path, tensors, **metadata)
    rehash(w / TRAJ, ["nodes", 1, "sha256"], path)
    return ["backtrack", "-T", "t", "--name", "new", "--iters", "40", "--interval", "10"]


def state_metadata(w: World, **metadata: str) -> list[str]:
    """The run's resume state with changed metadata, and a manifest that vouches for it."""
    manifest = json.loads((w / RUN_MANIFEST).read_text())
    path = w / RUN / manifest["state"]["file"]
    rewrite_denoiser(path, **metadata)
    rehash(w / RUN_MANIFEST, ["state", "sha256"], path)
    return EXTEND


def state_tensor(w: World, key: str, value) -> list[str]:
    from disback_cli.store.tensorfile import encode_safetensors, read_safetensors

    manifest = json.loads((w / RUN_MANIFEST).read_text())
    path = w / RUN / manifest["state"]["file"]
    tensors, metadata, _ = read_safetensors(path)
    tensors[key] = value(tensors[key])
    path.write_bytes(encode_safetensors(tensors, metadata))
    rehash(w / RUN_MANIFEST, ["state", "sha256"], path)
    return EXTEND


def adaptive_state(w: World, schedule: dict) -> list[str]:
    """A run trained with --switch adaptive whose saved switch state is nonsense."""
    set_in(w / RUN_MANIFEST, ["config", "switch"], "adaptive")
    return [*state_metadata(w, extra=json.dumps({"schedule": schedule})), "--switch", "adaptive"]


def sample_folder(w: World, status: str = "complete", extra: str | None = None) -> list[str]:
    """A PNG folder as `disback sample` writes it (4 images), optionally spoilt."""
    folder = write_folder(w / "pngs", images_like(4, 1, channels=1))
    write_record(folder, status, [0, 1, 2, 3], {"dataset": "digits"})
    if extra:
        (folder / extra).write_bytes(encode_png(images_like(1, 2, channels=1)[0]))
    return ["evaluate", "pngs"]


def npz_header(w: World, shape: tuple, dtype: str = "<f4") -> list[str]:
    """An .npz whose `samples` header declares `shape` over a few bytes of data."""
    import zipfile

    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    text = repr(header).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + b"\x00" * 16
    with zipfile.ZipFile(w / "bomb.npz", "w") as archive:
        archive.writestr("samples.npy", npy)
    return ["evaluate", "bomb.npz", "--dataset", "ring2d"]


def small_memory(w: World, command: list[str]) -> list[str]:
    """A machine with 64 MiB: sizes that cannot fit are refused before anything is written."""
    w.monkeypatch.setattr("disback_cli.store.fileio.physical_memory", lambda: 64 << 20)
    return command


HOSTILE = [
    # 1. Paths in manifests stay inside their run directory, in disback's own names.
    Case(
        "node file absolute",
        lambda w: (
            set_in(w / TRAJ, ["nodes", 1, "file"], absolute(w, VICTIM)),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "node 1 must be file 'nodes/node-001.safetensors'",
    ),
    Case(
        "node file ../ out of the run",
        lambda w: (set_in(w / TRAJ, ["nodes", 2, "file"], "../outside/victim.txt"), EXTEND)[-1],
        "node 2 must be file 'nodes/node-002.safetensors'",
    ),
    Case(
        "node file through nodes/../..",
        lambda w: (
            recording(w),
            set_in(w / TRAJ, ["nodes", 1, "file"], "nodes/../../outside/victim.txt"),
            RECORD_AGAIN,
        )[-1],
        "must be file 'nodes/node-001.safetensors'",
    ),
    Case(
        "node file named as another node",
        lambda w: (
            set_in(w / TRAJ, ["nodes", 1, "file"], "nodes/node-002.safetensors"),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "node 1 must be file",
    ),
    Case(
        "path node of another preconditioning, rehashed",
        lambda w: foreign_node(
            w,
            network=ring_metadata()["network"].replace('"sigma_data":1.4', '"sigma_data":1.0'),
        ),
        "nodes/node-001.safetensors: network differs from the teacher's",
    ),
    Case(
        "path node missing a tensor, rehashed",
        lambda w: foreign_node(
            w, {k: v for k, v in ring_tensors().items() if k != "model.noise_freqs"}
        ),
        "nodes/node-001.safetensors: network differs from the teacher's",
    ),
    Case(
        "path node with a header that is not JSON, rehashed",
        lambda w: (
            write_and(
                w / T / "nodes" / "node-001.safetensors", b"\x08" + bytes(7) + b"{nojson}", []
            ),
            rehash(w / TRAJ, ["nodes", 1, "sha256"], w / T / "nodes" / "node-001.safetensors"),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "node-001.safetensors: not a valid safetensors file (truncated or corrupt)",
    ),
    Case(
        "node 0 given a file",
        lambda w: (
            set_in(w / TRAJ, ["nodes", 0, "file"], VICTIM),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "node 0 must be file None",
    ),
    Case(
        "generator file absolute, extend",
        lambda w: (set_in(w / RUN_MANIFEST, ["generator", "file"], absolute(w, VICTIM)), EXTEND)[
            -1
        ],
        "generator file must be 'checkpoints/generator-00000020.safetensors'",
    ),
    Case(
        "generator_ema file ../ for sample",
        lambda w: (
            set_in(w / RUN_MANIFEST, ["generator_ema", "file"], "../../../outside/victim.txt"),
            ["sample", "-T", "t", "-n", "3", "-o", "x.npz"],
        )[-1],
        "generator-ema file must be",
    ),
    Case(
        "state file absolute, extend",
        lambda w: (set_in(w / RUN_MANIFEST, ["state", "file"], absolute(w, VICTIM)), EXTEND)[-1],
        "state file must be",
    ),
    Case(
        "state file of another step",
        lambda w: (
            set_in(w / RUN_MANIFEST, ["state", "file"], "checkpoints/state-00000010.safetensors"),
            EXTEND,
        )[-1],
        "state file must be",
    ),
    Case(
        "metrics path out of the run",
        lambda w: (set_in(w / RUN_MANIFEST, ["metrics"], "../../../outside/victim.txt"), EXTEND)[
            -1
        ],
        "metrics: Input should be 'metrics.jsonl'",
    ),
    Case(
        "record resume state absolute",
        lambda w: (
            recording(w),
            set_in(
                w / TRAJ, ["state"], {"file": absolute(w, VICTIM), "sha256": "0" * 64, "step": 30}
            ),
            RECORD_AGAIN,
        )[-1],
        "state file must be 'state/record-00000030.safetensors'",
    ),
    Case(
        "run name in manifest with ../",
        lambda w: (set_in(w / RUN_MANIFEST, ["name"], "../x"), EXTEND)[-1],
        "name: String should match pattern",
    ),
    Case(
        "teacher source is /dev/zero",
        lambda w: (
            set_in(w / TRAJ, ["teacher", "source"], "/dev/zero"),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "/dev/zero: not a regular file",
    ),
    Case(
        "teacher source is an outside file",
        lambda w: (
            set_in(w / TRAJ, ["teacher", "source"], absolute(w, VICTIM)),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "is not the one t was recorded with (sha256 differs)",
    ),
    Case(
        "student file of a manifest changed",
        lambda w: (
            set_in(
                w / TRAJ,
                ["generator_init"],
                {
                    "kind": "file",
                    "sigma_init": 2.5,
                    "file": absolute(w, VICTIM),
                    "sha256": "1" * 64,
                },
            ),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "sha256 does not match the manifest",
    ),
    Case(
        "student of kind file without a file",
        lambda w: (
            set_in(w / TRAJ, ["generator_init"], {"kind": "file", "sigma_init": 2.5}),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "a G0 of kind 'file' needs file and sha256",
    ),
    # 2. Symbolic links are not followed, replaced or deleted through.
    Case(
        "lock file is a link to an outside file",
        lambda w: (link(w, str(RUN / ".lock"), VICTIM), EXTEND)[-1],
        ".lock: is a symbolic link",
    ),
    Case(
        "lock file is a hard link to an outside file",
        lambda w: (os.link(w / VICTIM, w / RUN / ".lock"), EXTEND)[-1],
        ".lock: not a regular file of its own",
    ),
    Case(
        "pickle with a tuple nested a million deep as a dict key",
        lambda w: write_and(
            w / "t.pkl",
            b"\x80\x02}K\x01" + b"\x85" * 1_000_000 + b"K\x02s.",
            ["teacher", "inspect", "t.pkl"],
        ),
        "values nested more than 1000 deep",
    ),
    Case(
        "nodes/ is a link to an outside folder",
        lambda w: (
            recording(w),
            link(w, "t/nodes", outside_folder_like(w, ["node-003.safetensors", "x.txt"])),
            RECORD_AGAIN,
        )[-1],
        "has sub-folders holding files disback did not write (nodes)",
    ),
    Case(
        "checkpoints/ is a link to an outside folder",
        lambda w: (
            link(
                w, str(RUN / "checkpoints"), outside_folder_like(w, ["state-00000030.safetensors"])
            ),
            EXTEND,
        )[-1],
        "has sub-folders holding files disback did not write (checkpoints)",
    ),
    Case(
        "trajectory manifest is a link",
        lambda w: (link(w, "t/manifest.json", VICTIM), ["backtrack", "-T", "t", "--name", "new"])[
            -1
        ],
        "manifest.json: is a symbolic link",
    ),
    Case(
        "run manifest is a link",
        lambda w: (link(w, str(RUN_MANIFEST), VICTIM), ["sample", "-T", "t", "-n", "3"])[-1],
        "manifest.json: is a symbolic link",
    ),
    Case(
        "metrics.jsonl is a link",
        lambda w: (link(w, str(RUN / "metrics.jsonl"), VICTIM), EXTEND)[-1],
        "metrics.jsonl: is a symbolic link",
    ),
    Case(
        "backtrack/ is a link",
        lambda w: (
            link(w, "t/backtrack", "outside/dir"),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "t/backtrack: is a symbolic link",
    ),
    Case(
        "run folder is a link",
        lambda w: (link(w, str(RUN), "outside/dir"), ["sample", "-T", "t", "-n", "3"])[-1],
        "default: is a symbolic link",
    ),
    Case(
        "node file is a link",
        lambda w: (
            link(w, "t/nodes/node-002.safetensors", VICTIM),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "node-002.safetensors: is a symbolic link",
    ),
    Case(
        "generator file is a link",
        lambda w: (
            link(w, str(generator_file(w).relative_to(w.root)), VICTIM),
            ["sample", "-T", "t", "-n", "3"],
        )[-1],
        "is a symbolic link",
    ),
    Case(
        "sample folder is a link",
        lambda w: (
            link(w, "pngs", "outside/dir"),
            ["sample", "--teacher", "builtin:digits", "--steps", "2", "-n", "2", "-o", "pngs"],
        )[-1],
        "pngs: exists and is not a folder",
    ),
    # 3. Cleanup removes only what disback wrote; foreign files are refused, never deleted.
    Case(
        "record into a folder with the user's state/",
        lambda w: write_and(
            w / "d" / "state" / "mine.txt",
            "user data",
            ["record", "--teacher", "builtin:ring2d", "--out", "d"],
        ),
        "d holds files disback did not write (state/mine.txt)",
    ),
    Case(
        "record into a folder with the user's files",
        lambda w: write_and(
            w / "d" / "notes.txt",
            "user data",
            ["record", "--teacher", "builtin:ring2d", "--out", "d"],
        ),
        "d holds files disback did not write (notes.txt)",
    ),
    Case(
        "record into a folder with a backtrack/",
        lambda w: write_and(
            w / "d" / "backtrack" / "x" / "y",
            "user data",
            ["record", "--teacher", "builtin:ring2d", "--out", "d"],
        ),
        "holds files disback did not write (backtrack/)",
    ),
    Case(
        "resume with a foreign file in nodes/",
        lambda w: (
            recording(w),
            write_and(w / T / "nodes" / "notes.txt", "user data", RECORD_AGAIN),
        )[-1],
        "(nodes/notes.txt)",
    ),
    Case(
        "resume with a foreign folder in state/",
        lambda w: (recording(w), (w / T / "state" / "keep").mkdir(parents=True), RECORD_AGAIN)[-1],
        "(state/keep/)",
    ),
    Case(
        "record --force with a foreign file in nodes/",
        lambda w: write_and(
            w / T / "nodes" / "mine.bin",
            "user data",
            [*RECORD_AGAIN[:-2], "--batch", "32", "--force"],
        ),
        "(nodes/mine.bin)",
    ),
    Case(
        "backtrack --force with a foreign file in checkpoints/",
        lambda w: write_and(
            w / RUN / "checkpoints" / "best.safetensors",
            "user data",
            ["backtrack", "-T", "t", "--iters", "20", "--batch", "32", "--force"],
        ),
        "(checkpoints/best.safetensors)",
    ),
    Case(
        "extend with a foreign file in checkpoints/",
        lambda w: write_and(w / RUN / "checkpoints" / "generator-5.safetensors", "x", EXTEND),
        "(checkpoints/generator-5.safetensors)",
    ),
    Case(
        "new run in a folder with the user's files",
        lambda w: write_and(
            w / T / "backtrack" / "new" / "notes.txt",
            "x",
            ["backtrack", "-T", "t", "--name", "new"],
        ),
        "new holds files disback did not write (notes.txt)",
    ),
    Case(
        "empty run name",
        lambda w: ["backtrack", "-T", "t", "--name", "", "--force"],
        "--name '' is not a plain run name",
        2,
    ),
    Case(
        "run name ../x",
        lambda w: ["backtrack", "-T", "t", "--name", "../x", "--force"],
        "--name '../x' is not a plain run name",
        2,
    ),
    Case(
        "run name a/b",
        lambda w: ["sample", "-T", "t", "--name", "a/b"],
        "is not a plain run name",
        2,
    ),
    Case(
        "run name hidden",
        lambda w: ["backtrack", "-T", "t", "--name", ".git"],
        "is not a plain run name",
        2,
    ),
    Case(
        "run name absolute",
        lambda w: ["evaluate", "-T", "t", "--name", absolute(w, "outside")],
        "is not a plain run name",
        2,
    ),
    Case(
        "sample into a folder with the user's images",
        lambda w: (
            write_folder(w / "imgs", images_like(2, 0)),
            ["sample", "--teacher", "builtin:digits", "--steps", "2", "-n", "2", "-o", "imgs"],
        )[-1],
        "imgs holds files `disback sample` did not write",
    ),
    Case(
        "sample into a folder with a foreign record",
        lambda w: write_and(
            w / "imgs" / "provenance.json",
            '{"kind": "other"}',
            ["sample", "--teacher", "builtin:digits", "--steps", "2", "-n", "2", "-o", "imgs"],
        ),
        "(provenance.json)",
    ),
    Case(
        "sample into a folder with an extra file beside its samples",
        lambda w: (
            sample_folder(w, extra="00000/notes.png"),
            ["sample", "--teacher", "builtin:digits", "--steps", "2", "-n", "2", "-o", "pngs"],
        )[-1],
        "(00000/notes.png)",
    ),
    Case(
        "sample into a file",
        lambda w: write_and(
            w / "file",
            "x",
            ["sample", "--teacher", "builtin:digits", "--steps", "2", "-n", "2", "-o", "file"],
        ),
        "file: exists and is not a folder",
    ),
    # 4. Pickles: no code runs, no memory is corrupted, no resource is unbounded.
    Case(
        "numpy dtype and scalar (inspect)",
        lambda w: numpy_scalar_pickle(w, ["teacher", "inspect", "evil.pkl"]),
        "numpy dtype 'V8' is not a plain number type",
    ),
    Case(
        "numpy dtype and scalar (convert)",
        lambda w: numpy_scalar_pickle(w, ["teacher", "convert", "evil.pkl", "out.safetensors"]),
        "evil.pkl:",
    ),
    Case(
        "numpy dtype and scalar (record)",
        lambda w: numpy_scalar_pickle(w, ["record", "--out", "o", "--teacher", "evil.pkl"]),
        "evil.pkl:",
    ),
    Case(
        "numpy dtype and scalar (sample --teacher)",
        lambda w: numpy_scalar_pickle(w, ["sample", "-n", "2", "--teacher", "evil.pkl"]),
        "evil.pkl:",
    ),
    Case(
        "numpy dtype and scalar through a manifest",
        lambda w: (
            numpy_scalar_pickle(w, []),
            set_in(w / TRAJ, ["teacher", "source"], "evil.pkl"),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "(sha256 differs)",
    ),
    Case(
        "torch + os.system",
        lambda w: named_global_pickle(w, "torch", "os.system"),
        "refusing torch.os.system: not on the allow-list",
    ),
    Case(
        "torch.load",
        lambda w: named_global_pickle(w, "torch", "load"),
        "refusing torch.load: not on the allow-list",
    ),
    Case(
        "torch.hub.load",
        lambda w: named_global_pickle(w, "torch.hub", "load"),
        "refusing torch.hub.load",
    ),
    Case(
        "torch.serialization.load",
        lambda w: named_global_pickle(w, "torch.serialization", "load"),
        "refusing torch.serialization.load",
    ),
    Case(
        "builtins.eval",
        lambda w: named_global_pickle(w, "builtins", "eval"),
        "refusing builtins.eval",
    ),
    Case("numpy.load", lambda w: named_global_pickle(w, "numpy", "load"), "refusing numpy.load"),
    Case(
        "torch + os.system by STACK_GLOBAL",
        lambda w: stack_global_pickle(w, "torch", "os.system"),
        "refusing torch.os.system: not on the allow-list",
    ),
    Case(
        "torch + storage._load_from_bytes (torch.load of a nested pickle)",
        lambda w: stack_global_pickle(w, "torch", "storage._load_from_bytes"),
        "refusing torch.storage._load_from_bytes: not on the allow-list",
    ),
    Case(
        "torch._utils._import_dotted_name",
        lambda w: stack_global_pickle(w, "torch._utils", "_import_dotted_name"),
        "refusing torch._utils._import_dotted_name: not on the",
    ),
    Case(
        "torch.load by STACK_GLOBAL",
        lambda w: stack_global_pickle(w, "torch", "load"),
        "refusing torch.load: not on the allow-list",
    ),
    Case(
        "torch.hub.load by STACK_GLOBAL",
        lambda w: stack_global_pickle(w, "torch.hub", "load"),
        "refusing torch.hub.load: not on the allow-list",
    ),
    Case(
        "torch.serialization.load by STACK_GLOBAL",
        lambda w: stack_global_pickle(w, "torch.serialization", "load"),
        "refusing torch.serialization.load: not on the",
    ),
    Case(
        "builtins.eval by STACK_GLOBAL",
        lambda w: stack_global_pickle(w, "builtins", "eval"),
        "refusing builtins.eval: not on the allow-list",
    ),
    Case("stride-0 tensor asking for 4 TB", huge_tensor_pickle, "huge.pkl:"),
    Case("pickle nested 100 000 deep", deep_pickle, "deep.pkl:"),
    Case("pickle with a reference cycle in its kwargs", cyclic_pickle, "loop.pkl:"),
    Case(
        "pickle that is a FIFO",
        lambda w: fifo(w, "fifo.pkl", ["teacher", "inspect", "fifo.pkl"]),
        "fifo.pkl: not a regular file",
    ),
    Case(
        "teacher that is /dev/zero",
        lambda w: ["record", "--teacher", "/dev/zero", "--out", "o"],
        "/dev/zero: not a regular file",
    ),
    Case("spec with depth 10**8", lambda w: spec_file(w, arch_kwargs__depth=10**8), "out of range"),
    Case("spec with data_shape of 10**9", lambda w: spec_file(w, data_shape=[10**9]), "data_shape"),
    Case(
        "spec with 10**6 dimensions", lambda w: spec_file(w, data_shape=[1] * 10**6), "data_shape"
    ),
    Case(
        "spec with an unknown kwarg",
        lambda w: spec_file(w, arch_kwargs__colour="red"),
        "network spec does not fit mlp/edm",
    ),
    Case(
        "spec with a list kwarg of 10**5 items",
        lambda w: spec_file(w, arch_kwargs__hidden=[1] * 10**5),
        "more than 16 items",
    ),
    Case(
        "spec with absurd sigma_data",
        lambda w: spec_file(w, precond_kwargs={"sigma_data": 1e300}),
        "not a finite number of sensible size",
    ),
    Case("spec with 10**6 labels", lambda w: spec_file(w, label_dim=10**6), "label_dim"),
    Case(
        "spec with sigma_data a string",
        lambda w: spec_file(w, precond_kwargs={"sigma_data": "half"}),
        "network spec of mlp does not run",
    ),
    Case(
        "spec with a width of -1",
        lambda w: spec_file(w, arch_kwargs__hidden=-1),
        "network spec does not fit mlp/edm",
    ),
    Case(
        "denoiser format version of 5000 digits",
        lambda w: (
            rewrite_denoiser(generator_file(w), format_version="9" * 5000),
            ["sample", "--generator", str(generator_file(w)), "-n", "2", "-o", "x.npz"],
        )[-1],
        "unknown denoiser format version",
    ),
    Case(
        "student spec with depth 10**8",
        lambda w: [
            "record",
            "--teacher",
            "builtin:ring2d",
            "--out",
            "o",
            "--student-arch-kwargs",
            '{"depth": 100000000}',
        ],
        "--student-arch-kwargs: invalid configuration: arch_kwargs.depth",
        2,
    ),
    Case(
        "teacher recipe with an unknown architecture",
        lambda w: write_and(
            w / "r.toml",
            '[teacher_train]\ndataset = "ring2d"\narch = "nope"\n',
            ["teacher", "train", "--config", "r.toml", "--out", "x.safetensors"],
        ),
        "unknown architecture 'nope'",
        2,
    ),
    Case(
        "device meta",
        lambda w: ["sample", "-T", "t", "-n", "2", "--device", "meta"],
        "unknown device 'meta'",
        2,
    ),
    Case(
        "device cpu:99",
        lambda w: ["sample", "-T", "t", "-n", "2", "--device", "cpu:99"],
        "unknown device 'cpu:99'",
        2,
    ),
    Case(
        "a seed given twice",
        lambda w: ["sample", "-T", "t", "--seeds", "5,5,5"],
        "a seed appears more than once",
        2,
    ),
    # 5. Non-finite and absurd values are refused at the flag, before any file is written.
    Case(
        "--lr inf",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--lr", "inf"],
        "lr: Input should be a finite number",
        2,
    ),
    Case(
        "--sigma-init inf",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--sigma-init", "inf"],
        "sigma-init: Input should be a finite number",
        2,
    ),
    Case(
        "--ema-halflife-kimg inf",
        lambda w: ["backtrack", "-T", "t", "--ema-halflife-kimg", "inf"],
        "ema-halflife-kimg: Input should be a finite number",
        2,
    ),
    Case(
        "--sid-alpha nan",
        lambda w: ["backtrack", "-T", "t", "--sid-alpha", "nan"],
        "sid-alpha: Input should be a finite number",
        2,
    ),
    Case(
        "--grad-clip inf",
        lambda w: ["backtrack", "-T", "t", "--grad-clip", "inf"],
        "grad-clip: Input should be a finite number",
        2,
    ),
    Case(
        "--lr-g 1e20",
        lambda w: ["backtrack", "-T", "t", "--lr-g", "1e20"],
        "lr-g: Input should be less than or equal to 1",
        2,
    ),
    Case(
        "--p-std 0",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--p-std", "0"],
        "p-std: Input should be greater than 0",
        2,
    ),
    Case(
        "--dropout 1",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--dropout", "1"],
        "dropout: Input should be less than 1",
        2,
    ),
    Case(
        "--nodes 1000",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--iters", "5000", "--nodes", "1000"],
        "nodes: Input should be less than or equal to 999",
        2,
    ),
    Case(
        "--batch 10**9",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--batch", "1000000000"],
        "batch: Input should be less than or equal to 1048576",
        2,
    ),
    Case(
        "--batch too big for this machine",
        lambda w: small_memory(
            w, ["record", "--teacher", "builtin:ring2d", "--out", "o", "--batch", "1000000"]
        ),
        "--batch 1000000 needs 0.1 GiB for its tensors alone",
        2,
    ),
    Case(
        "-n 10**10",
        lambda w: ["sample", "-T", "t", "-n", "10000000000"],
        "n: Input should be less than or equal to 10000000",
        2,
    ),
    Case(
        "--seeds of 10**11",
        lambda w: ["sample", "-T", "t", "--seeds", "0-99999999999"],
        "more than 10000000 in one call",
        2,
    ),
    Case(
        "--seeds beyond 2**62",
        lambda w: ["sample", "-T", "t", "--seeds", "9" * 30],
        "seeds must lie in",
        2,
    ),
    Case(
        "npz too big for this machine",
        lambda w: small_memory(w, ["sample", "-T", "t", "-n", "9000000", "-o", "big.npz"]),
        "samples in one .npz needs",
        2,
    ),
    Case(
        "recipe lr = nan",
        lambda w: write_and(
            w / "r.toml",
            '[record]\nteacher = "builtin:ring2d"\nlr = nan\n',
            ["record", "--config", "r.toml"],
        ),
        "lr: Input should be a finite number",
        2,
    ),
    Case(
        "recipe lr = inf",
        lambda w: write_and(
            w / "r.toml",
            "[backtrack]\nlr_g = inf\n",
            ["backtrack", "-T", "t", "--config", "r.toml"],
        ),
        "r.toml [backtrack] lr_g: Input should be a finite",
        2,
    ),
    Case(
        "manifest with a NaN",
        lambda w: write_and(
            w / TRAJ,
            (w / TRAJ).read_text().replace('"dist_to_teacher": 0.0', '"dist_to_teacher": NaN'),
            ["backtrack", "-T", "t"],
        ),
        "NaN is not a JSON number",
    ),
    Case(
        "manifest with Infinity",
        lambda w: write_and(
            w / RUN_MANIFEST,
            (w / RUN_MANIFEST)
            .read_text()
            .replace('"elapsed_seconds": ', '"elapsed_seconds": Infinity, "x": '),
            EXTEND,
        ),
        "Infinity is not a JSON number",
    ),
    Case(
        "manifest step 10**50",
        lambda w: (set_in(w / RUN_MANIFEST, ["step"], 10**50), EXTEND)[-1],
        "step: Input should be less than or equal to",
    ),
    Case(
        "manifest negative distance",
        lambda w: (
            set_in(w / TRAJ, ["nodes", 1, "dist_to_teacher"], -1),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "dist-to-teacher: Input should be greater than or equal to 0",
    ),
    Case(
        "manifest config lr 1e9",
        lambda w: (set_in(w / RUN_MANIFEST, ["config", "lr_g"], 1e9), EXTEND)[-1],
        "lr-g: Input should be less than or equal to 1",
    ),
    Case(
        "manifest nested 10**5 deep",
        lambda w: write_and(w / TRAJ, "[" * 100_000 + "]" * 100_000, ["backtrack", "-T", "t"]),
        "unreadable manifest (nested too deeply)",
    ),
    Case(
        "manifest of 17 MiB",
        lambda w: write_and(w / TRAJ, " " * (17 << 20), ["backtrack", "-T", "t"]),
        "is more than a manifest may hold",
    ),
    Case(
        "manifest is a folder",
        lambda w: ((w / TRAJ).unlink(), (w / TRAJ).mkdir(), ["backtrack", "-T", "t"])[-1],
        "manifest.json: is a directory",
    ),
    # 6. Garbage in is refused, not turned into NaN samples or a mixed evaluation.
    Case("teacher with NaN weights", nan_weights, "holds NaN or infinite values"),
    Case("generator with an infinite weight", nan_generator, "holds NaN or infinite values"),
    Case(
        "generator whose output overflows",
        overflowing_generator,
        "the generator produced NaN or infinite values (seeds 0..4)",
    ),
    Case(
        "generator sigma_init NaN",
        lambda w: generator_info(w, '{"role": "generator", "sigma_init": NaN}'),
        "bad info metadata (NaN is not a JSON number)",
    ),
    Case(
        "generator sigma_init a string",
        lambda w: generator_info(w, '{"role": "generator", "sigma_init": "big"}'),
        "sigma-init: Input should be a valid number",
    ),
    Case(
        "generator sigma_init missing",
        lambda w: generator_info(w, '{"role": "generator"}'),
        "a generator file needs sigma_init",
    ),
    Case(
        "generator info not an object", lambda w: generator_info(w, "[1, 2]"), "bad info metadata"
    ),
    Case(
        "generator format_version garbage",
        lambda w: (
            rewrite_denoiser(generator_file(w), format_version="abc"),
            ["sample", "--generator", str(generator_file(w)), "-n", "2", "-o", "x.npz"],
        )[-1],
        "unknown denoiser format version 'abc'",
    ),
    Case(
        "safetensors metadata not text",
        lambda w: write_and(
            w / "m.safetensors",
            _header_with({"__metadata__": {"format": 7}}),
            ["teacher", "inspect", "m.safetensors"],
        ),
        "not a valid safetensors file",
    ),
    Case(
        "samples with NaN",
        lambda w: (
            np.savez(w / "n.npz", samples=np.full((5, 2), np.nan)),
            ["evaluate", "n.npz", "--dataset", "ring2d"],
        )[-1],
        "samples contain NaN or infinite",
    ),
    Case(
        "one sample",
        lambda w: (
            np.savez(w / "one.npz", samples=np.zeros((1, 2))),
            ["evaluate", "one.npz", "--dataset", "ring2d"],
        )[-1],
        "1 samples; evaluation needs",
    ),
    Case(
        "zero samples",
        lambda w: (
            np.savez(w / "zero.npz", samples=np.zeros((0, 2))),
            ["evaluate", "zero.npz", "--dataset", "ring2d"],
        )[-1],
        "0 samples; evaluation needs",
    ),
    Case(
        "samples of one number",
        lambda w: (
            np.savez(w / "s0.npz", samples=np.float32(3)),
            ["evaluate", "s0.npz", "--dataset", "ring2d"],
        )[-1],
        "'samples' must be numbers of shape",
    ),
    Case(
        "npz declaring 10**15 floats",
        lambda w: npz_header(w, (10**15, 2)),
        "declared shape (1000000000000000, 2) does not fit",
    ),
    Case("npz of objects", lambda w: npz_header(w, (2, 2), "|O"), "are not supported"),
    Case(
        "npz that is not a zip",
        lambda w: write_and(w / "z.npz", "not a zip", ["evaluate", "z.npz"]),
        "not a readable .npz file",
    ),
    Case(
        "PNG folder without a completion record",
        lambda w: (
            write_folder(w / "f", images_like(4, 0)),
            ["evaluate", "f", "--dataset", "digits"],
        )[-1],
        "not a folder written by `disback sample`",
    ),
    Case(
        "PNG folder with an extra image",
        lambda w: sample_folder(w, extra="00000/x.png"),
        "holds 1 images the sample record does not list (00000/x.png)",
    ),
    Case(
        "PNG folder a kill cut short",
        lambda w: sample_folder(w, status="writing"),
        "did not finish writing this folder",
    ),
    Case(
        "PNG folder missing an image",
        lambda w: (sample_folder(w), (w / "pngs" / png_name(3)).unlink(), ["evaluate", "pngs"])[-1],
        "1 images of the sample record",
    ),
    Case(
        "PNG folder with a malformed record",
        lambda w: (
            sample_folder(w),
            set_in(w / "pngs" / "provenance.json", ["seeds"], [[5, 1]]),
            ["evaluate", "pngs"],
        )[-1],
        "malformed sample record",
    ),
    Case(
        "reference with NaN",
        lambda w: (
            np.savez(w / "r.npz", mu=np.full(4, np.nan), sigma=np.eye(4)),
            [*sample_folder(w), "--ref", "r.npz"],
        )[-1],
        "the reference holds NaN or infinite values",
    ),
    Case(
        "reference sigma not symmetric",
        lambda w: (
            np.savez(w / "r.npz", mu=np.zeros(2), sigma=np.array([[1.0, 5.0], [0.0, 1.0]])),
            [*sample_folder(w), "--ref", "r.npz"],
        )[-1],
        "sigma is not symmetric",
    ),
    Case(
        "reference of zero features",
        lambda w: (
            np.savez(w / "r.npz", mu=np.zeros(0), sigma=np.zeros((0, 0))),
            [*sample_folder(w), "--ref", "r.npz"],
        )[-1],
        "do not fit",
    ),
    Case(
        "reference with mismatched shapes",
        lambda w: (
            np.savez(w / "r.npz", mu=np.zeros(4), sigma=np.eye(3)),
            [*sample_folder(w), "--ref", "r.npz"],
        )[-1],
        "do not fit",
    ),
    Case(
        "on-the-fly evaluation of one sample",
        lambda w: ["evaluate", "-T", "t", "-n", "1"],
        "1 samples per repeat; evaluation needs at least 2",
        2,
    ),
    Case(
        "no digits at all",
        lambda w: (
            np.savez(w / "d.npz", images=np.zeros((0, 8, 8, 1), np.uint8)),
            ["evaluate", "d.npz", "--dataset", "digits"],
        )[-1],
        "0 images; evaluation needs at least 2",
    ),
    Case(
        "samples whose provenance names a list as data set",
        lambda w: (
            np.savez(
                w / "m.npz",
                samples=np.zeros((5, 2)),
                meta=np.asarray(json.dumps({"dataset": ["ring2d"]})),
            ),
            ["evaluate", "m.npz"],
        )[-1],
        "the samples' provenance names no data set",
    ),
    Case(
        "digits of the wrong size",
        lambda w: (
            np.savez(w / "d.npz", images=images_like(3, 0, size=16, channels=1)),
            ["evaluate", "d.npz", "--dataset", "digits"],
        )[-1],
        "FD-digits needs at least 2 images of 8x8x1",
    ),
    # 7. Malformed files each get their own message, never "internal error".
    Case(
        "empty node list",
        lambda w: (set_in(w / TRAJ, ["nodes"], []), ["backtrack", "-T", "t", "--name", "new"])[-1],
        "nodes: List should have at least 1 item",
    ),
    Case(
        "node indices out of order",
        lambda w: (
            edit_json(w / TRAJ, lambda m: m["nodes"].reverse()),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "nodes must be numbered 0, 1, 2, ... in order",
    ),
    Case(
        "fewer nodes than the config",
        lambda w: (
            edit_json(w / TRAJ, lambda m: m.update(nodes=m["nodes"][:2])),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "1 path nodes recorded, the config asks for 3",
    ),
    Case(
        "node 0 not the teacher",
        lambda w: (
            set_in(w / TRAJ, ["nodes", 0, "sha256"], "2" * 64),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "node 0 must be the teacher",
    ),
    Case(
        "node steps not increasing",
        lambda w: (
            set_in(w / TRAJ, ["nodes", 2, "step"], 1),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "node steps must increase",
    ),
    Case(
        "node plan of the wrong length",
        lambda w: (set_in(w / TRAJ, ["node_plan"], [5]), ["backtrack", "-T", "t", "--name", "new"])[
            -1
        ],
        "node_plan must list 3 increasing",
    ),
    Case(
        "path of one node in a run",
        lambda w: (set_in(w / RUN_MANIFEST, ["path_sha256"], ["0" * 64]), EXTEND)[-1],
        "path-sha256: List should have at least 2 items",
    ),
    Case(
        "run beyond its iterations",
        lambda w: (set_in(w / RUN_MANIFEST, ["config", "iters"], 10), EXTEND)[-1],
        "step 20 is beyond iters 10",
    ),
    Case(
        "run state without generator",
        lambda w: (
            set_in(w / RUN_MANIFEST, ["generator"], None),
            set_in(w / RUN_MANIFEST, ["status"], "running"),
            ["sample", "-T", "t"],
        )[-1],
        "generator, generator_ema and state are saved together",
    ),
    Case(
        "sha256 that is not one",
        lambda w: (set_in(w / RUN_MANIFEST, ["generator", "sha256"], "xyz"), EXTEND)[-1],
        "String should match pattern",
    ),
    Case(
        "schema_version true",
        lambda w: (set_in(w / TRAJ, ["schema_version"], True), ["backtrack", "-T", "t"])[-1],
        "unknown schema_version True",
    ),
    Case(
        "manifest a list",
        lambda w: write_and(w / TRAJ, "[1, 2]", ["backtrack", "-T", "t"]),
        "expected a disback.trajectory manifest, found 'list'",
    ),
    Case(
        "state of another step", lambda w: state_metadata(w, step="10"), "holds step '10', not 20"
    ),
    Case(
        "state without optimiser moments",
        lambda w: state_tensor(w, "optim.generator.0.exp_avg", lambda t: t[:1]),
        "has the wrong shape or type",
    ),
    Case(
        "state with a NaN moment",
        lambda w: state_tensor(
            w, "optim.fake.1.exp_avg_sq", lambda t: torch.full_like(t, float("nan"))
        ),
        "holds impossible values",
    ),
    Case(
        "state random stream of the wrong size",
        lambda w: state_tensor(w, "rng", lambda t: t[:10]),
        "random state rng is missing or malformed",
    ),
    Case(
        "state with NaN weights",
        lambda w: state_tensor(
            w, "module.fake.model.layers.0.weight", lambda t: torch.full_like(t, float("nan"))
        ),
        "holds NaN or infinite values",
    ),
    Case(
        "state loop state not JSON", lambda w: state_metadata(w, extra="{"), "unreadable loop state"
    ),
    Case(
        "adaptive switch state nonsense",
        lambda w: adaptive_state(w, {"node": "x"}),
        "malformed adaptive-switch state",
    ),
    Case(
        "adaptive switch state beyond the path",
        lambda w: adaptive_state(
            w, {"node": 99, "smoothed": None, "best": None, "since_best": 0, "on_node": 0}
        ),
        "lies beyond this path",
    ),
    Case(
        "metrics.jsonl with a non-object line for plot",
        lambda w: write_and(
            w / RUN / "metrics.jsonl", "[1]\n", ["plot", str(RUN), "--out", "c.png"]
        ),
        "line 1 is not a metrics line",
    ),
    Case(
        "metrics line whose eval is a number",
        lambda w: write_and(
            w / RUN / "metrics.jsonl",
            '{"iteration": 10, "eval": 3}\n',
            ["plot", str(RUN), "--out", "c.png"],
        ),
        "line 1 is not a metrics line ('eval' must be an object)",
    ),
    Case(
        "metrics.jsonl that is a FIFO",
        lambda w: (
            (w / RUN / "metrics.jsonl").unlink(),
            fifo(w, str(RUN / "metrics.jsonl"), EXTEND),
        )[-1],
        "not a regular file",
    ),
    Case(
        "metrics.jsonl truncated for plot",
        lambda w: write_and(
            w / RUN / "metrics.jsonl",
            '{"iteration": 10}\n{"iterat',
            ["plot", str(RUN), "--out", "c.png"],
        ),
        "line 2 is not a metrics line",
    ),
    Case(
        "recipe table misspelt",
        lambda w: write_and(
            w / "r.toml",
            "[recrod]\niters = 5\n",
            ["record", "--teacher", "builtin:ring2d", "--config", "r.toml"],
        ),
        "unknown table [recrod]",
        2,
    ),
    Case(
        "recipe key outside a table",
        lambda w: write_and(
            w / "r.toml",
            'lr = 1e-4\n[record]\nteacher = "builtin:ring2d"\n',
            ["record", "--config", "r.toml"],
        ),
        "key 'lr' is outside any table",
        2,
    ),
    Case(
        "recipe nested table",
        lambda w: write_and(
            w / "r.toml",
            '[record]\nteacher = "builtin:ring2d"\n[record.extra]\nx = 1\n',
            ["record", "--config", "r.toml"],
        ),
        "r.toml [record]: unknown key 'extra'",
        2,
    ),
    Case(
        "recipe that is a folder",
        lambda w: ((w / "r.toml").mkdir(), ["record", "--config", "r.toml"])[-1],
        "is a directory",
        2,
    ),
    Case(
        "recipe not UTF-8",
        lambda w: write_and(w / "r.toml", b"\xff\xfe[record]", ["record", "--config", "r.toml"]),
        "not a valid TOML recipe",
        2,
    ),
    Case(
        "error message with a newline in a name",
        lambda w: ["record", "--teacher", "a\nb.safetensors", "--out", "o"],
        "a\\nb.safetensors: no such file",
    ),
]


def _header_with(header: dict) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_input_is_one_clean_line_and_changes_nothing(
    case, template, tmp_path, monkeypatch, cli
):
    run_case(case, template, tmp_path, monkeypatch, cli)


def test_the_corpus_is_large_enough():
    check_ids(BASIC_CASES + HOSTILE)
    assert len(BASIC_CASES) + len(HOSTILE) >= 120
