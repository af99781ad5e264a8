"""The command line as a user and a shell script see it: exit codes, one-line errors, JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import disback_cli
from conftest import REPO, checkout_env
from disback_cli.cli.app import app

COMMANDS = ["record", "backtrack", "sample", "evaluate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(cli, command):
    result = cli(command, "--help")
    assert result.code == 0 and "Example: disback " + command in result.stdout


def test_debug_shows_the_traceback(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("backtrack", "--trajectory", "nowhere", "--debug")
    assert result.code == 1 and "Traceback" in result.stderr


def test_recipe_values_apply_and_flags_override(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[record]\nteacher = "builtin:ring2d"\niters = 40\nnodes = 2\nbatch = 32\n')
    result = cli("record", "--config", recipe, "--iters", "30", "--out", tmp_path / "t", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [n["step"] for n in summary["nodes"]] == [0, 15, 30]
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["config"]["batch"] == 32 and manifest["config"]["iters"] == 30


def test_recipe_with_unknown_key_is_refused(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[record]\nteacher = "builtin:ring2d"\nlearning_rate = 1\n')
    result = cli("record", "--config", recipe, "--out", tmp_path / "t")
    assert result.code == 2 and result.stderr.count("\n") == 1
    assert f"{recipe} [record]: unknown key 'learning_rate'" in result.stderr


def test_the_documented_invocations_run_end_to_end(cli, tmp_path, monkeypatch):
    """The five commands of the README (shortened) with --json output parsed by a script."""
    monkeypatch.chdir(tmp_path)
    steps = [
        [
            "record",
            "--teacher",
            "builtin:ring2d",
            "--out",
            "runs/t1",
            "--iters",
            "60",
            "--nodes",
            "3",
            "--seed",
            "0",
            "--json",
        ],
        [
            "backtrack",
            "--trajectory",
            "runs/t1",
            "--iters",
            "40",
            "--interval",
            "10",
            "--seed",
            "0",
            "--json",
        ],
        [
            "backtrack",
            "--trajectory",
            "runs/t1",
            "--iters",
            "40",
            "--no-trajectory",
            "--name",
            "baseline",
            "--seed",
            "0",
            "--json",
        ],
        [
            "sample",
            "--trajectory",
            "runs/t1",
            "-n",
            "500",
            "--out",
            "runs/t1/samples.npz",
            "--json",
        ],
        ["evaluate", "runs/t1/samples.npz", "--json"],
    ]
    outputs = []
    for args in steps:
        result = cli(*args)
        assert result.code == 0, (args, result.stderr)
        outputs.append(json.loads(result.stdout))
    assert outputs[0]["status"] == "complete" and len(outputs[0]["nodes"]) == 4
    assert outputs[1]["step"] == 40 and outputs[2]["run"].endswith("baseline")
    assert outputs[3]["n"] == 500
    report = outputs[4]
    assert report["dataset"] == "ring2d" and report["results"][0]["n"] == 500
    assert set(report["results"][0]) - {"samples"} == set(report["floor"])
    again = cli(
        "record",
        "--teacher",
        "builtin:ring2d",
        "--out",
        "runs/t1",
        "--iters",
        "60",
        "--nodes",
        "3",
        "--seed",
        "0",
    )
    assert again.code == 0 and "already complete" in again.stderr


def test_installed_entry_point_gives_clean_errors():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "disback_cli",
            "record",
            "--teacher",
            "builtin:ring2d",
            "--nodes",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
        env=checkout_env(),
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid configuration: --nodes: ")
    assert "Traceback" not in result.stderr


def test_app_registers_every_command():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert set(COMMANDS) <= names


def test_this_process_tests_the_checkout():
    """The package under test is the one beside these tests, not an installed copy."""
    assert Path(disback_cli.__file__).resolve().parent == REPO / "disback_cli"


def test_subprocesses_run_the_checkout_from_any_folder(tmp_path):
    """`checkout_env` (which every test that starts Python uses) puts this checkout first,
    after extra entries such as a sitecustomize hook, and keeps what PYTHONPATH held."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os\nos.environ['HOOKED'] = '1'\n")
    code = "import os, disback_cli; print(disback_cli.__file__); print(os.environ.get('HOOKED'))"
    for env in (checkout_env(), checkout_env(hook, EXTRA="1")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert Path(out[0]).resolve().parent == REPO / "disback_cli"
    assert out[1] == "1"  # the hook ran too
    assert env["EXTRA"] == "1" and env["PYTHONPATH"].split(os.pathsep)[:2] == [str(hook), str(REPO)]


def test_config_mistakes_name_what_was_typed_and_the_fix(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[backtrack]\nlr_gg = 1e-4\n")
    for args, expected in (
        (
            ["backtrack", "-T", tmp_path, "--config", recipe],
            f"{recipe} [backtrack]: unknown key 'lr_gg'; did you mean 'lr_g'?",
        ),
        (
            ["backtrack", "-T", tmp_path, "--set", "lr_gg=1"],
            "--set: unknown key 'lr_gg'; did you mean 'lr_g'?",
        ),
        (
            ["backtrack", "-T", tmp_path, "--set", "lr_g=abc"],
            "--set lr_g: Input should be a valid number",
        ),
        (["record", "--out", tmp_path / "t"], "--teacher is required (builtin:NAME"),
    ):
        result = cli(*args)
        assert result.code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert expected in result.stderr, result.stderr
    assert not (tmp_path / "t").exists()


def test_a_built_in_teachers_name_without_its_prefix_says_the_prefix(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("record", "--teacher", "ring2d", "--out", tmp_path / "t")
    assert result.code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "say builtin:ring2d" in result.stderr and not (tmp_path / "t").exists()


def test_a_backtrack_run_given_as_trajectory_names_the_trajectory(cli, small_trajectory, tmp_path):
    import shutil

    from disback_cli.config import BacktrackConfig
    from disback_cli.stages.backtrack import run_backtrack

    traj = tmp_path / "t"
    shutil.copytree(small_trajectory, traj)
    run_backtrack(BacktrackConfig(iters=2, interval=1, batch=8, device="cpu"), traj, "r1")
    result = cli("backtrack", "-T", traj / "backtrack" / "r1", "--iters", "4")
    assert result.code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"pass -T {traj} --name r1" in result.stderr


def test_no_flag_name_is_cut_in_any_help_at_80_columns(cli, monkeypatch):
    import click
    import typer

    from disback_cli.cli.app import app

    monkeypatch.setenv("COLUMNS", "80")
    root = typer.main.get_command(app)
    commands = [((name,), command) for name, command in root.commands.items()]
    for path, command in list(commands):
        if isinstance(command, click.Group):
            commands += [((*path, sub), c) for sub, c in command.commands.items()]
    checked = 0
    for path, command in commands:
        if isinstance(command, click.Group):
            continue
        result = cli(*path, "--help")
        assert result.code == 0, (path, result.stderr)
        assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80
        for param in command.params:
            for flag in (*param.opts, *param.secondary_opts):
                if flag.startswith("-"):
                    assert flag in result.stdout, (path, flag)
                    checked += 1
    assert checked > 200  # every flag of every command (225 today)


def test_a_library_error_that_introduces_its_detail_keeps_the_detail():
    from disback_cli.errors import summary_of

    loading = RuntimeError(
        "Error(s) in loading state_dict for CLIPModel:\n\tUnexpected key(s) in state_dict: "
        '"text_projection.bias".'
    )
    assert summary_of(loading) == (
        "Error(s) in loading state_dict for CLIPModel: "
        'Unexpected key(s) in state_dict: "text_projection.bias".'
    )
    assert summary_of(OSError("no such file\nsecond line")) == "no such file"
    assert summary_of(RuntimeError("")) == "RuntimeError"
    assert len(summary_of(RuntimeError("x" * 1000))) == 300
