"""A recipe's [sample] table is used, never silently dropped: `backtrack --config RECIPE` records
it in the run, and `sample -T RUN` without --config draws with it (flags, --set and another
--config win); a tampered record is refused in one line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from disback_cli.store.layout import MANIFEST, backtrack_dir

TINY = ["--iters", "20", "--interval", "5", "--batch", "64", "--save-every", "10"]

RECIPE = """
[backtrack]
device = "cpu"

[sample]
weights = "raw"
batch = 7
"""

OTHER = """
[sample]
batch = 5
"""

NOTE = "sample settings: [sample] of recipe.toml, recorded by backtrack"


@pytest.fixture(scope="module")
def trained(small_trajectory, tmp_path_factory, cli_module):
    """A tiny run backtracked with `recipe.toml` (given relative to the working directory)."""
    root = tmp_path_factory.mktemp("sample-recipe")
    shutil.copytree(small_trajectory, root / "t")
    (root / "recipe.toml").write_text(RECIPE)
    (root / "other.toml").write_text(OTHER)
    with contextlib.chdir(root):
        done = cli_module("backtrack", "-T", "t", *TINY, "--config", "recipe.toml", "--quiet")
    assert done.code == 0, done.stderr
    return root


def sample(cli, root: Path, *args: str):
    """`disback sample -T t ARGS` in `root`, its result and the --json summary (if given)."""
    with contextlib.chdir(root):
        done = cli("sample", "-T", "t", "-n", "9", *args)
    summary = json.loads(done.stdout) if done.code == 0 and "--json" in args else None
    return done, summary


def manifest_path(root: Path) -> Path:
    return backtrack_dir(root / "t", "default") / MANIFEST


def test_backtrack_records_the_recipes_sample_table(trained):
    recorded = json.loads(manifest_path(trained).read_text())["sample_recipe"]
    sha = hashlib.sha256((trained / "recipe.toml").read_bytes()).hexdigest()
    assert recorded == {
        "file": "recipe.toml",
        "sha256": sha,
        "table": {"weights": "raw", "batch": 7},
    }


def test_sample_without_config_uses_the_recorded_table(trained, cli):
    done, summary = sample(cli, trained, "--json")
    assert done.code == 0, done.stderr
    assert summary["config"]["weights"] == "raw" and summary["config"]["batch"] == 7
    with np.load(summary["out"]) as data:
        assert json.loads(str(data["meta"]))["weights"] == "raw"
    done, _ = sample(cli, trained, "--out", "plain.npz")
    assert done.code == 0 and NOTE in done.stderr
    assert done.stderr.count("sample settings:") == 1


def test_flags_and_set_override_the_recorded_table(trained, cli):
    done, summary = sample(cli, trained, "--weights", "ema", "--set", "batch=3", "--json")
    assert done.code == 0, done.stderr
    assert summary["config"]["weights"] == "ema" and summary["config"]["batch"] == 3
    done, summary = sample(cli, trained, "--batch", "4", "--json")
    assert summary["config"]["weights"] == "raw" and summary["config"]["batch"] == 4


def test_another_config_replaces_the_recorded_table(trained, cli):
    done, summary = sample(cli, trained, "--config", "other.toml", "--json")
    assert done.code == 0, done.stderr
    assert summary["config"]["weights"] == "ema" and summary["config"]["batch"] == 5
    done, _ = sample(cli, trained, "--config", "other.toml", "--out", "other.npz")
    assert done.code == 0 and "sample settings:" not in done.stderr


def test_a_resumed_run_keeps_what_it_first_recorded(trained, tmp_path, cli):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    before = json.loads(manifest_path(tmp_path).read_text())["sample_recipe"]
    with contextlib.chdir(tmp_path):
        done = cli("backtrack", "-T", "t", *TINY[:-2], "--iters", "25", "-c", "other.toml", "-q")
    assert done.code == 0, done.stderr
    after = json.loads(manifest_path(tmp_path).read_text())
    assert after["step"] == 25 and after["sample_recipe"] == before


def test_a_run_without_a_recorded_table_samples_with_defaults(trained, tmp_path, cli):
    """Manifests written before the field existed read as before."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    raw = json.loads(manifest_path(tmp_path).read_text())
    del raw["sample_recipe"]
    manifest_path(tmp_path).write_text(json.dumps(raw))
    done, summary = sample(cli, tmp_path, "--json")
    assert done.code == 0, done.stderr
    assert summary["config"]["weights"] == "ema" and summary["config"]["batch"] == 1000


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"weights": "raw", "bogus": 1}, "unknown key 'bogus'"),
        ({"weights": "fp16"}, "sample_recipe weights"),
        ({"batch": "many"}, "sample_recipe batch"),
        ({"batch": 0}, "sample_recipe batch"),
        ({"weights\nforged line": "raw"}, "unknown key"),
        ([1, 2], "table"),
        ({"seeds": "0-3," * 20_000}, "longer than"),
    ],
    ids=["unknown-key", "wrong-literal", "wrong-type", "out-of-range", "newline", "list", "big"],
)
def test_a_tampered_recorded_table_is_refused_in_one_line(trained, tmp_path, cli, table, expected):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    raw = json.loads(manifest_path(tmp_path).read_text())
    raw["sample_recipe"]["table"] = table
    manifest_path(tmp_path).write_text(json.dumps(raw))
    done, _ = sample(cli, tmp_path, "--out", "s.npz")
    assert done.code != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "manifest.json" in done.stderr and expected in done.stderr
    assert not (tmp_path / "s.npz").exists()
    done, _ = sample(cli, tmp_path, "--config", "other.toml", "--out", "s.npz")
    if isinstance(table, dict) and len(json.dumps(table)) < 1000:  # the manifest itself reads
        assert done.code == 0, done.stderr  # and the given recipe wins: the table is not read


def test_a_bad_sample_table_refuses_backtrack_before_it_trains(small_trajectory, tmp_path, cli):
    shutil.copytree(small_trajectory, tmp_path / "t")
    (tmp_path / "typo.toml").write_text('[sample]\nwieghts = "raw"\n')
    with contextlib.chdir(tmp_path):
        done = cli("backtrack", "-T", "t", *TINY, "--device", "cpu", "--config", "typo.toml")
    assert done.code == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "typo.toml [sample]: unknown key 'wieghts'; did you mean 'weights'?" in done.stderr
    assert not backtrack_dir(tmp_path / "t", "default").exists()
