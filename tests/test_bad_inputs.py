"""Bad input of every kind: one line on stderr, a non-zero exit code, no traceback, and no file
in the working directory created, changed or removed (see `corpus`). The cases of files that
others wrote on purpose (paths, links, pickles, hostile runs) are in test_hostile_inputs.py.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from corpus import (
    RING,
    RUN,
    Case,
    T,
    World,
    cut,
    edit_json,
    ring_metadata,
    run_case,
    teacher_file,
    write_and,
)
from test_edm import Exploit
from test_fid import StandInInception, images_like, write_npz

from conftest import checkout_env
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.networks import build_denoiser
from disback_cli.models.teachers import builtin_path, open_teacher
from disback_cli.store.fileio import sha256_file


def other_teacher_node(w: World) -> list[str]:
    """Node 3 replaced by a node of a different network; the manifest updated to match."""
    teacher = open_teacher("builtin:ring2d")
    spec = teacher.spec.model_copy(
        update={"arch_kwargs": {**teacher.spec.arch_kwargs, "hidden": 32}}
    )
    node = w / "t" / "nodes" / "node-003.safetensors"
    save_denoiser(node, build_denoiser(spec), spec, {"role": "path_node"})
    edit_json(w / "t" / "manifest.json", lambda m: m["nodes"][3].update(sha256=sha256_file(node)))
    return ["backtrack", "-T", "t", "--name", "new", "--iters", "10"]


def held_lock(w: World) -> list[str]:
    """Another live process holds the lock of the run directory."""
    run = w / "t" / "backtrack" / "default"
    code = (
        "import sys, time\nfrom disback_cli.store.lock import run_lock\n"
        f"with run_lock({str(run)!r}, 'backtrack'):\n    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=checkout_env()
    )
    w.processes.append(holder)
    assert holder.stdout.readline().strip() == "held"
    return ["backtrack", "-T", "t", "--iters", "40", "--batch", "64", "--save-every", "10"]


def _stand_in_reference(w: World) -> list[str]:
    """A reference for 16x16 images, 8x8 samples; the detector is a stand-in for Inception."""
    detector = w / "stand-in.pt"
    torch.jit.script(StandInInception()).save(str(detector))
    w.monkeypatch.setenv("DISBACK_INCEPTION", str(detector))
    w.monkeypatch.setattr(
        "disback_cli.evaluation.detectors.INCEPTION_SHA256", sha256_file(detector)
    )
    write_npz(w / "small.npz", images_like(6, 1, size=8))
    np.savez(
        w / "ref.npz",
        mu=np.zeros(2048),
        sigma=np.eye(2048),
        meta=np.asarray(
            json.dumps(
                {
                    "detector": {
                        "name": "inception-2015-12-05",
                        "mode": "legacy_tensorflow",
                        "sha256": sha256_file(detector),
                    },
                    "image_shape": [16, 16, 3],
                    "n": 6,
                }
            )
        ),
    )
    return ["evaluate", "small.npz", "--ref", "ref.npz"]


CASES = [
    # teachers
    Case(
        "teacher missing",
        lambda w: ["record", "--teacher", "nope.safetensors", "--out", "o"],
        "nope.safetensors: no such file",
    ),
    Case(
        "teacher is a directory",
        lambda w: ["record", "--teacher", "t", "--out", "o"],
        "is a directory",
    ),
    Case(
        "teacher truncated",
        lambda w: (
            shutil.copy(RING, w / "c.safetensors"),
            cut(w / "c.safetensors"),
            ["record", "--teacher", "c.safetensors", "--out", "o"],
        )[-1],
        "not a valid safetensors file",
    ),
    Case(
        "teacher garbage",
        lambda w: write_and(
            w / "g.safetensors",
            bytes(range(256)) * 16,
            ["record", "--teacher", "g.safetensors", "--out", "o"],
        ),
        "not a valid safetensors",
    ),
    Case(
        "teacher without metadata",
        lambda w: (
            safetensors.torch.save_file({"w": torch.zeros(2)}, w / "plain.safetensors"),
            ["record", "--teacher", "plain.safetensors", "--out", "o"],
        )[-1],
        "not a disback denoiser file",
    ),
    Case(
        "teacher with broken network metadata",
        lambda w: [
            "record",
            "--teacher",
            teacher_file(w / "m.safetensors", ring_metadata(network='{"arch": 7}')),
            "--out",
            "o",
        ],
        "bad network metadata",
    ),
    Case(
        "teacher from a future format",
        lambda w: [
            "record",
            "--teacher",
            teacher_file(w / "f.safetensors", ring_metadata(format_version="9")),
            "--out",
            "o",
        ],
        "newer than this disback understands",
    ),
    Case(
        "teacher weights of another shape",
        lambda w: [
            "record",
            "--teacher",
            teacher_file(
                w / "s.safetensors",
                ring_metadata(),
                {k: torch.zeros(1) for k in safetensors.torch.load_file(RING)},
            ),
            "--out",
            "o",
        ],
        "has shape",
    ),
    Case(
        "teacher pickle missing",
        lambda w: ["record", "--teacher", "edm.pkl"],
        "edm.pkl: no such file",
    ),
    Case("teacher not given", lambda w: ["record", "--iters", "10"], "--teacher is required", 2),
    Case(
        "unknown built-in teacher",
        lambda w: ["record", "--teacher", "builtin:nope"],
        "unknown built-in teacher",
    ),
    Case(
        "garbage pickle",
        lambda w: write_and(
            w / "g.pkl", b"\x80\x05garbage", ["record", "--teacher", "g.pkl", "--out", "o"]
        ),
        "not a readable EDM network pickle",
    ),
    Case(
        "hostile pickle",
        lambda w: write_and(
            w / "evil.pkl",
            pickle.dumps({"ema": Exploit(w / "PWNED")}),
            ["record", "--teacher", "evil.pkl", "--out", "o"],
        ),
        "refusing posix.system: not on the allow-list",
    ),
    Case(
        "pickle without a network",
        lambda w: write_and(
            w / "e.pkl", pickle.dumps({"x": 1}), ["record", "--teacher", "e.pkl", "--out", "o"]
        ),
        "no 'ema' network",
    ),
    Case(
        "student of another data shape",
        lambda w: [
            "record",
            "--teacher",
            "builtin:ring2d",
            "--student",
            str(builtin_path("digits")),
            "--out",
            "o",
        ],
        "student data shape or classes differ",
    ),
    # manifests and the files they name
    Case(
        "not a run directory",
        lambda w: ["backtrack", "-T", "nowhere"],
        "not a disback run directory",
    ),
    Case(
        "manifest schema_version unknown",
        lambda w: (
            edit_json(w / T / "manifest.json", lambda m: m.update(schema_version=0)),
            ["backtrack", "-T", "t"],
        )[-1],
        "unknown schema_version 0",
    ),
    Case(
        "manifest from a future disback",
        lambda w: (
            edit_json(w / T / "manifest.json", lambda m: m.update(schema_version=7)),
            ["backtrack", "-T", "t"],
        )[-1],
        "schema_version 7 was written by a newer disback",
    ),
    Case(
        "manifest not JSON",
        lambda w: write_and(w / T / "manifest.json", b"{oops", ["backtrack", "-T", "t"]),
        "unreadable manifest",
    ),
    Case(
        "manifest of the wrong kind",
        lambda w: ["backtrack", "-T", str(RUN)],
        "expected a disback.trajectory manifest",
    ),
    Case(
        "manifest missing a field",
        lambda w: (
            edit_json(w / T / "manifest.json", lambda m: m.pop("nodes")),
            ["backtrack", "-T", "t"],
        )[-1],
        "nodes: Field required",
    ),
    Case(
        "manifest names a missing node",
        lambda w: (
            (w / T / "nodes/node-002.safetensors").unlink(),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "path node 2 named by the manifest is missing",
    ),
    Case(
        "node sha256 mismatch",
        lambda w: (
            cut(w / T / "nodes/node-001.safetensors", 0.99),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "sha256 does not match the manifest",
    ),
    Case("node from another teacher", other_teacher_node, "network differs from the teacher's"),
    Case(
        "trajectory still recording",
        lambda w: (
            edit_json(w / T / "manifest.json", lambda m: m.update(status="recording")),
            ["backtrack", "-T", "t", "--name", "new"],
        )[-1],
        "trajectory is still recording",
    ),
    Case(
        "resume state sha256 mismatch",
        lambda w: (
            cut(next((w / RUN / "checkpoints").glob("state-*")), 0.99),
            ["backtrack", "-T", "t", "--iters", "40", "--batch", "64", "--save-every", "10"],
        )[-1],
        "sha256 does not match the manifest",
    ),
    Case(
        "generator sha256 mismatch",
        lambda w: (
            cut(next((w / RUN / "checkpoints").glob("generator-ema-*")), 0.99),
            ["sample", "-T", "t", "-n", "5", "-o", "x.npz"],
        )[-1],
        "sha256 does not match the manifest",
    ),
    Case(
        "teacher moved to another file",
        lambda w: ["backtrack", "-T", "t", "--teacher", "builtin:digits"],
        "is not the one t was recorded with",
    ),
    Case("run directory locked by a live process", held_lock, "is in use by pid"),
    # output locations
    Case(
        "output under a regular file",
        lambda w: write_and(
            w / "file", b"x", ["record", "--teacher", "builtin:ring2d", "--out", "file/t"]
        ),
        "cannot create the directory",
    ),
    Case(
        "changed config without --force",
        lambda w: ["backtrack", "-T", "t", "--iters", "20", "--batch", "32", "--save-every", "10"],
        "was trained with another configuration",
        2,
    ),
    # flags
    Case(
        "negative iters",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--iters", "-5"],
        "iters: Input should be greater than or equal to 1",
        2,
    ),
    Case(
        "nodes > iters",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--iters", "3", "--nodes", "5"],
        "nodes (5) must not exceed iters (3)",
        2,
    ),
    Case("interval 0", lambda w: ["backtrack", "-T", "t", "--interval", "0"], "interval", 2),
    Case(
        "unknown loss", lambda w: ["backtrack", "-T", "t", "--loss", "gan"], "unknown loss 'gan'", 2
    ),
    Case(
        "save-every off the log lines",
        lambda w: ["backtrack", "-T", "t", "--save-every", "15", "--log-every", "10"],
        "must be a multiple of log-every",
        2,
    ),
    Case(
        "adaptive switch that cannot switch early",
        lambda w: ["backtrack", "-T", "t", "--switch", "adaptive", "--interval", "25"],
        "switch-patience (50) must be below interval (25)",
        2,
    ),
    Case(
        "n 0",
        lambda w: ["sample", "-T", "t", "-n", "0"],
        "n: Input should be greater than or equal to 1",
        2,
    ),
    Case(
        "seed range inverted",
        lambda w: ["sample", "-T", "t", "--seeds", "10-5"],
        "seed range '10-5' is inverted",
        2,
    ),
    Case(
        "seed list garbage",
        lambda w: ["sample", "-T", "t", "--seeds", "a-b"],
        "bad seed list 'a-b'",
        2,
    ),
    Case(
        "-n and --seeds together",
        lambda w: ["sample", "-T", "t", "-n", "5", "--seeds", "0-4"],
        "either -n or --seeds",
        2,
    ),
    Case(
        "class of an unconditional model",
        lambda w: ["sample", "-T", "t", "--class", "3"],
        "out of range",
        2,
    ),
    Case("unknown option", lambda w: ["record", "--bogus"], "No such option", 2),
    Case(
        "unknown device",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--device", "tpu"],
        "unknown device 'tpu'",
        2,
    ),
    Case(
        "cuda without a GPU",
        lambda w: ["record", "--teacher", "builtin:ring2d", "--device", "cuda"],
        "CUDA is not available",
    ),
    Case(
        "recipe missing", lambda w: ["record", "--config", "nope.toml"], "recipe file not found", 2
    ),
    Case(
        "recipe not TOML",
        lambda w: write_and(w / "r.toml", b"[record\niters=", ["record", "--config", "r.toml"]),
        "not a valid TOML recipe",
        2,
    ),
    Case(
        "recipe value of the wrong type",
        lambda w: write_and(
            w / "r.toml",
            b'[record]\nteacher = "builtin:ring2d"\niters = "many"\n',
            ["record", "--config", "r.toml"],
        ),
        "iters: Input should be a valid integer",
        2,
    ),
    # sample / evaluate
    Case(
        "sample without a backtrack run",
        lambda w: ["sample", "-T", "t", "--name", "none"],
        "no backtrack run named 'none'",
    ),
    Case(
        "sample a run that saved no generator",
        lambda w: (
            edit_json(
                w / RUN / "manifest.json",
                lambda m: m.update(
                    generator=None, generator_ema=None, state=None, status="running"
                ),
            ),
            ["sample", "-T", "t"],
        )[-1],
        "has not saved a generator yet",
    ),
    Case(
        "evaluate a run that does not exist",
        lambda w: ["evaluate", "-T", "t", "--name", "x"],
        "no backtrack run named 'x'",
    ),
    Case("evaluate a missing file", lambda w: ["evaluate", "nothing.npz"], "no such file"),
    Case(
        "evaluate a file of unknown type",
        lambda w: write_and(w / "x.txt", b"hi", ["evaluate", "x.txt"]),
        "expected an image folder, an .npz or a dataset .zip",
    ),
    Case(
        "evaluate vectors against digits",
        lambda w: ["evaluate", "s.npz", "--dataset", "digits"],
        "cannot be scored against digits",
    ),
    Case("images of the wrong size for a reference", _stand_in_reference, "8x8 but"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_line_and_changes_nothing(
    case, template, tmp_path, monkeypatch, cli
):
    run_case(case, template, tmp_path, monkeypatch, cli)
