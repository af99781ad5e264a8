"""The README's ring walkthrough, run exactly as written (in bash, in a fresh folder), with two
stand-ins: RECIPE names a smaller recipe (the block reads it from the environment), and `make
venv` links the virtual environment these tests run in instead of building one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, checkout_env

SMALL_RING = """\
[record]
teacher = "builtin:ring2d"
iters = 60
nodes = 3
batch = 64
lr = 1e-4
seed = 0

[backtrack]
iters = 100
interval = 20
batch = 64
lr_g = 1e-4
lr_fake = 1e-3
eval_samples = 500
seed = 0
"""


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(
        r"<!-- walkthrough:start.*?-->\s*```bash\n(.*?)```\s*<!-- walkthrough:end", text, re.DOTALL
    )
    assert match, "README.md lost its walkthrough block"
    return match.group(1)


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    block = readme_block()
    assert block.splitlines()[0].startswith("make venv")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_make = bin_dir / "make"
    venv = Path(sys.prefix)
    fake_make.write_text(f'#!/bin/sh\n[ "$1" = venv ] || exit 2\nln -sfn {venv} .venv\n')
    fake_make.chmod(0o755)
    (tmp_path / "ring.toml").write_text(SMALL_RING)
    work = tmp_path / "checkout"
    work.mkdir()
    env = checkout_env(RECIPE=str(tmp_path / "ring.toml"), OMP_NUM_THREADS="1")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = work / "runs" / "ring"
    for name in ("disback.npz", "baseline.npz", "curves.png", "disback-grid.png"):
        assert (runs / name).stat().st_size > 0, name
    out = result.stdout
    assert "(mmd2)" in out  # the plot drew the logged metric, not an empty panel
    assert out.count("mmd2 vs exact samples") == 2  # both evaluations ...
    assert out.count("│ exact samples │") == 2  # ... each beside its floor
    assert "2 backtrack runs" in out and "baseline" in out and "default" in out
