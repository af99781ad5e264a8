"""`disback export` (issue 31): the safetensors export round-trips through `sample --generator`
bit for bit and through the README's loader, the model card's numbers are the run's, evaluations
are remembered by the run they measured, and the refusals: one line, nothing replaced that export
did not write."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_backtrack import At, crash

from conftest import backtracked_copy, run_cli
from disback_cli.config import BacktrackConfig
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.store.export_folder import RECORD
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest

BACKTRACK = dict(iters=20, interval=5, batch=64, save_every=10, eval_every=10, device="cpu")
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def trained(small_trajectory, tmp_path_factory):
    return backtracked_copy(small_trajectory, tmp_path_factory.mktemp("export"), **BACKTRACK)


def export(traj, out, *extra: str):
    return run_cli("export", "-T", traj, "--out", out, *extra)


def refused(result, *phrases: str) -> None:
    assert result.code != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr


def test_a_safetensors_export_samples_bit_for_bit_as_the_run(trained, tmp_path):
    result = export(trained, tmp_path / "e", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"] == ["README.md", "generator.safetensors"]
    samples = {}
    for key, source in (
        ("run", ["-T", trained]),
        ("export", ["--generator", tmp_path / "e" / "generator.safetensors"]),
    ):
        out = tmp_path / f"{key}.npz"
        assert run_cli("sample", *source, "-n", "300", "--out", out).code == 0
        samples[key] = np.load(out)["samples"]
    assert np.array_equal(samples["run"], samples["export"])


def test_the_readme_loader_reads_an_export_without_the_cli(trained, tmp_path):
    assert export(trained, tmp_path / "e").code == 0
    blocks = re.findall(
        r"```python\n(# load an exported generator.*?)```", README.read_text(), re.S
    )
    assert len(blocks) == 1 and len(blocks[0].splitlines()) <= 30
    scope = {"PATH": str(tmp_path / "e" / "generator.safetensors")}
    exec(blocks[0], scope)
    generator, info = scope["generator"], scope["info"]
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    assert info["role"] == "generator"
    ours = run_cli("sample", "--generator", scope["PATH"], "-n", "4", "--out", tmp_path / "s.npz")
    assert ours.code == 0
    from disback_cli.method.generator import load_generator

    reference, _ = load_generator(Path(scope["PATH"]), torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(generator(z), reference(z))


def test_the_card_quotes_the_run_files_and_the_last_evaluation_of_these_weights(trained, tmp_path):
    traj = tmp_path / "t"
    shutil.copytree(trained, traj)
    run_dir = backtrack_dir(traj, "default")
    scored = run_cli("evaluate", "-T", traj, "-n", "500", "--json")
    assert scored.code == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["recorded_in"] == str(run_dir / "evaluations.jsonl")
    result = export(traj, tmp_path / "e", "--json")
    assert result.code == 0, result.stderr
    card = (tmp_path / "e" / "README.md").read_text()
    facts = json.loads(result.stdout)["card"]
    run = read_manifest(run_dir, BacktrackManifest)
    recording = read_manifest(traj, TrajectoryManifest)
    assert facts["generator"]["sha256"] == run.generator_ema.sha256 in card
    assert recording.teacher.sha256 in card and f"{run.step} iterations" in card
    assert f"seed {run.config.seed}" in card and f"{recording.last_node} nodes" in card
    value = report["results"][0][report["key"]]
    assert facts["evaluation"]["results"][0][report["key"]] == value
    assert f"{value:.6g}" in card
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert facts["training_evaluation"] == {"iteration": run.step, **logged[-1]["eval"]}
    assert f"{logged[-1]['eval']['mmd2']:.6g}" in card
    # raw weights were never evaluated: the card says so rather than quoting the EMA's numbers
    raw = export(traj, tmp_path / "raw", "--weights", "raw")
    assert (
        raw.code == 0
        and "No evaluation of these weights" in (tmp_path / "raw" / "README.md").read_text()
    )


def test_evaluations_of_samples_are_recorded_by_the_run_whose_generator_drew_them(
    trained, tmp_path
):
    traj = tmp_path / "t"
    shutil.copytree(trained, traj)
    samples = tmp_path / "s.npz"
    assert (
        run_cli("sample", "-T", traj, "--weights", "raw", "-n", "300", "--out", samples).code == 0
    )
    report = json.loads(run_cli("evaluate", samples, "--json").stdout)
    log = backtrack_dir(traj, "default") / "evaluations.jsonl"
    assert report["recorded_in"] == str(log)
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    run = read_manifest(backtrack_dir(traj, "default"), BacktrackManifest)
    assert entry["generator_sha256"] == run.generator.sha256 and entry["weights"] == "raw"
    exported = tmp_path / "e"
    assert export(traj, exported).code == 0
    other = tmp_path / "o.npz"
    run_cli(
        "sample", "--generator", exported / "generator.safetensors", "-n", "300", "--out", other
    )
    report = json.loads(run_cli("evaluate", other, "--json").stdout)
    assert report["recorded_in"] is None  # an exported copy belongs to no run
    assert len(log.read_text().splitlines()) == 1


def test_refusals_are_one_line_and_replace_nothing_export_did_not_write(trained, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(export(trained, out), "not empty", "--force")
    refused(
        export(trained, tmp_path / "x", "--format", "diffusers"),
        "--format diffusers",
        "formats: safetensors, onnx",
    )
    refused(export(trained, tmp_path / "x", "--pipeline"), "--pipeline is for --format diffusers")
    assert not (tmp_path / "x").exists()
    (out / "generator.safetensors").write_text("also mine")
    refused(export(trained, out, "--force"), "is not a file disback export wrote")
    (out / "generator.safetensors").unlink()
    assert export(trained, out, "--force").code == 0
    assert (out / "notes.txt").read_text() == "mine"
    first = (out / "generator.safetensors").read_bytes()
    assert export(trained, out, "--force", "--dtype", "fp16").code == 0  # replaces its own file
    assert len((out / "generator.safetensors").read_bytes()) < len(first)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_unfinished_run_is_refused(small_trajectory, tmp_path):
    traj = tmp_path / "t"
    shutil.copytree(small_trajectory, traj)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(BacktrackConfig(**BACKTRACK, log_every=1), traj, reporter=At(15, crash))
    refused(export(traj, tmp_path / "e"), "has not finished", "iteration 10 of 20")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "record",
    [
        {"format": "disback.export-files", "files": {"../outside.txt": None}},
        {"format": "disback.export-files", "files": {"/etc/passwd": "0" * 64}},
        {"format": "disback.export-files", "files": {f"a{i}": None for i in range(20_000)}},
        {"format": "disback.export-files", "files": {"README.md": "not a sha256"}},
        {"format": "disback.export-files", "files": ["README.md"]},
        {"format": "something else", "files": {}},
        [1, 2],
    ],
)
def test_a_hostile_export_record_is_refused_and_deletes_nothing(trained, tmp_path, record):
    out = tmp_path / "e"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("keep")
    (out / RECORD).write_text(json.dumps(record))
    refused(export(trained, out, "--force"))
    assert (tmp_path / "outside.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == [RECORD]


def test_an_export_folder_reached_through_a_link_is_refused(trained, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    refused(export(trained, tmp_path / "link"), "symbolic link")
    out = tmp_path / "e"
    assert export(trained, out).code == 0
    (out / "generator.safetensors").unlink()
    (out / "generator.safetensors").symlink_to(tmp_path / "real" / "target")
    refused(export(trained, out, "--force"), "symbolic link")
    assert not (tmp_path / "real" / "target").exists()


def test_a_hostile_evaluations_log_is_refused(trained, tmp_path):
    traj = tmp_path / "t"
    shutil.copytree(trained, traj)
    (backtrack_dir(traj, "default") / "evaluations.jsonl").write_text('{"no": "sha"}\n')
    refused(export(traj, tmp_path / "e"), "evaluations.jsonl: line 1")


def test_an_evaluations_log_that_is_a_link_is_neither_followed_nor_written(trained, tmp_path):
    traj = tmp_path / "t"
    shutil.copytree(trained, traj)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    (backtrack_dir(traj, "default") / "evaluations.jsonl").symlink_to(victim)
    refused(run_cli("evaluate", "-T", traj, "-n", "300"), "symbolic link")
    refused(export(traj, tmp_path / "e"), "symbolic link")
    assert victim.read_text() == "keep\n" and not (tmp_path / "e").exists()


def test_the_licence_comes_from_the_teacher_folders_card_front_matter_only(tmp_path):
    from disback_cli.export.card import teacher_licence

    folder = tmp_path / "teacher"
    folder.mkdir()
    assert teacher_licence(str(folder)) is None  # no card
    card = folder / "README.md"
    card.write_text("---\nlibrary_name: diffusers\nlicense: creativeml-openrail-m\n---\n# SD\n")
    assert teacher_licence(str(folder)) == "creativeml-openrail-m"
    card.write_text("# SD\nlicense: not front matter\n")
    assert teacher_licence(str(folder)) is None
    card.unlink()
    (tmp_path / "elsewhere.md").write_text("---\nlicense: mit\n---\n")
    card.symlink_to(tmp_path / "elsewhere.md")
    assert teacher_licence(str(folder)) is None  # a link is not followed
    assert teacher_licence("builtin:ring2d") is None


def test_force_touches_only_files_that_are_still_what_export_wrote(trained, tmp_path):
    out = tmp_path / "e"
    assert export(trained, out).code == 0
    record = json.loads((out / RECORD).read_text())
    assert set(record["files"]) == {"README.md", "generator.safetensors"}
    # a record that claims someone's file: --force neither replaces nor deletes it
    (out / "notes.txt").write_text("mine")
    record["files"]["notes.txt"] = "0" * 64
    (out / RECORD).write_text(json.dumps(record))
    assert export(trained, out, "--force").code == 0
    assert (out / "notes.txt").read_text() == "mine"
    # an exported file edited since: refused, kept as it is
    with open(out / "README.md", "a") as card:
        card.write("my own notes\n")
    refused(
        export(trained, out, "--force"), "README.md: exists and is not a file disback export wrote"
    )
    assert (out / "README.md").read_text().endswith("my own notes\n")
