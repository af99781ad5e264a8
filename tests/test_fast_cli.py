"""Help, the version and refused flags answer without importing torch (issue #32: a typo on a
loaded login node cost 13-21 s). Checked by what a fresh interpreter imported, never by timing;
benchmarks/cli_startup.py measures the CPU time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import checkout_env
from disback_cli.config import LOSS_NAMES
from disback_cli.config.teacher_kinds import TEXT_DEFAULTS, defaults_by_kind
from disback_cli.method.losses import GENERATOR_LOSSES
from disback_cli.models.teachers import open_teacher

# Run `disback ARGS` in this interpreter and report its exit code, its stderr's first line and
# which heavy modules it imported.
PROBE = """
import contextlib, io, json, sys
from disback_cli.cli.app import main
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
    try:
        main(json.loads(sys.argv[1]))
        code = 0
    except SystemExit as exc:
        code = exc.code
heavy = sorted(m for m in ("torch", "numpy", "safetensors", "diffusers") if m in sys.modules)
print(json.dumps({"code": code, "stderr": err.getvalue(), "heavy": heavy}))
"""

ANSWERS = [
    (["--help"], 0),
    (["--version"], 0),
    (["backtrack", "--help"], 0),
    (["record", "--help"], 0),
    (["sample", "--help"], 0),
    (["evaluate", "--help"], 0),
    (["doctor", "--help"], 0),
    (["export", "--help"], 0),
    (["teacher", "train", "--help"], 0),
    (["teacher", "list"], 0),
    (["backtrack", "--lr-gg", "1e-4"], 2),  # a mistyped flag
    (["backtrack", "--set", "lr_g=abc"], 2),  # a value that is not a number
    (["backtrack", "--loss", "vds"], 2),  # an unknown loss
    (["record"], 2),  # no --teacher
    (["recrod"], 2),  # a mistyped command
    (["runs", "."], 0),  # no runs here: a table needs no torch either
]


def answer(*args: str) -> dict:
    probe = [sys.executable, "-c", PROBE, json.dumps(list(args))]
    done = subprocess.run(probe, capture_output=True, text=True, env=checkout_env(), check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize(("args", "code"), ANSWERS, ids=[" ".join(a) for a, _ in ANSWERS])
def test_help_version_and_refusals_import_no_torch(args, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = answer(*args)
    assert result["code"] == code, result["stderr"]
    assert result["heavy"] == []
    if code:
        assert result["stderr"].startswith("error: ") and result["stderr"].count("\n") == 1


def test_a_command_that_works_still_imports_what_it_needs(tmp_path, monkeypatch):
    """The probe sees imports: the same probe on a command that runs a network finds torch."""
    monkeypatch.chdir(tmp_path)
    result = answer("teacher", "inspect", "builtin:ring2d")
    assert result["code"] == 0 and "torch" in result["heavy"]


def test_the_names_help_lists_are_the_registries():
    """`--help` reads names and defaults from data; the objects that act on them agree."""
    assert tuple(GENERATOR_LOSSES) == LOSS_NAMES
    ring = open_teacher("builtin:ring2d")
    chosen = ring.family.defaults(ring)
    assert chosen and all(defaults_by_kind(k)["vector"] == v for k, (v, _) in chosen.items())
    for kind, values in TEXT_DEFAULTS.items():
        assert all(defaults_by_kind(key)[kind] == value for key, value in values.items())
