"""torchrun with the gloo backend on 2 CPU processes: the same numbers as one process.

A 2-process run with per-rank batch B draws the random numbers of the global batch 2B and
averages gradients, so it must match a 1-process run with batch 2B up to float round-off; a
2-process `sample` must write byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import checkout_env, launch
from disback_cli.models.denoiser_files import load_denoiser
from disback_cli.runtime import sharding
from disback_cli.runtime.parallel import Execution
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, read_manifest

ENV = checkout_env(OMP_NUM_THREADS="1")  # same arithmetic in both launches; this checkout
RECORD = [
    "record",
    "--teacher",
    "builtin:ring2d",
    "--iters",
    "40",
    "--nodes",
    "2",
    "--seed",
    "1",
    "--device",
    "cpu",
    "--quiet",
]
BACKTRACK = [
    "backtrack",
    "--iters",
    "30",
    "--interval",
    "10",
    "--seed",
    "1",
    "--save-every",
    "10",
    "--log-every",
    "10",
    "--device",
    "cpu",
    "--quiet",
]


def disback(
    *args: str, processes: int = 1, cwd: Path, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`disback ARGS` in `cwd` (see `conftest.launch`; `fresh` for files compared byte for byte
    with the workers'), checked to succeed."""
    result = launch(cwd, *args, processes=processes, env=ENV, fresh=fresh, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_denoiser(path).denoiser.state_dict()


def assert_close(a: dict, b: dict) -> float:
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    return worst


def fake_two_rank_world(monkeypatch) -> None:
    """all_reduce (a sum) of a 2-rank world whose other rank holds v^2 + 1 wherever this one
    holds v: different values everywhere, whatever the buckets look like."""

    def all_reduce(tensor, op=None):
        assert op is None  # the default, a sum
        tensor += tensor**2 + 1

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)


@pytest.mark.parametrize("bucket_elements", [4, sharding.BUCKET_ELEMENTS], ids=["small", "default"])
def test_gradients_are_averaged_over_ranks_not_summed(monkeypatch, bucket_elements):
    """Rank 0 of a (faked) 2-process world: every gradient, in every bucket, becomes the mean
    (g + h) / 2 of its own g and the other rank's h; parameters without one are left alone."""
    fake_two_rank_world(monkeypatch)
    monkeypatch.setattr(sharding, "BUCKET_ELEMENTS", bucket_elements)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3,), (2, 2), (5,), (1,)]]
    grads = [torch.linspace(-1, 2, p.numel()).reshape(p.shape) for p in params]
    for p, g in zip(params[:3], grads, strict=False):
        p.grad = g.clone()  # the last parameter has no gradient
    Execution(torch.device("cpu"), rank=0, world_size=2).average_gradients(params)
    for p, g in zip(params[:3], grads, strict=False):
        torch.testing.assert_close(p.grad, (g + (g**2 + 1)) / 2)
    assert params[3].grad is None
    values = torch.tensor([0.5, 3.0])
    torch.testing.assert_close(
        Execution(torch.device("cpu"), rank=0, world_size=2).mean(values),
        torch.tensor([(0.5 + 1.25) / 2, (3.0 + 10.0) / 2]),
    )
    assert torch.equal(values, torch.tensor([0.5, 3.0]))  # the caller's tensor is not reduced


def test_each_rank_keeps_its_own_slice_of_the_global_batch():
    drawn = torch.arange(8)
    ranks = [Execution(torch.device("cpu"), rank=r, world_size=2) for r in (0, 1)]
    assert [ex.local(drawn).tolist() for ex in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ranks[1].global_batch(4) == 8
    assert Execution(torch.device("cpu")).local(drawn) is drawn


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    """Logged values first: they show an averaging bug plainly (summed gradients double the
    gradient norms), where Adam's scale invariance leaves the weights within round-off."""
    disback(*RECORD, "--batch", "64", "--out", "one", cwd=tmp_path)
    disback(*RECORD, "--batch", "32", "--out", "two", processes=2, cwd=tmp_path)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["global_batch"] == 64

    disback(*BACKTRACK, "-T", "one", "--batch", "64", "--name", "single", cwd=tmp_path)
    out = disback(
        *BACKTRACK,
        "-T",
        "one",
        "--batch",
        "32",
        "--name",
        "pair",
        processes=2,
        cwd=tmp_path,
    )
    assert "Traceback" not in out.stderr
    single, pair = (
        read_manifest(backtrack_dir(tmp_path / "one", n), BacktrackManifest)
        for n in ("single", "pair")
    )
    assert pair.world_size == 2 and pair.global_batch == 64 and pair.step == 30
    logs = [
        [
            json.loads(line)
            for line in (backtrack_dir(tmp_path / "one", n) / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        for n in ("single", "pair")
    ]
    assert [r["iteration"] for r in logs[0]] == [r["iteration"] for r in logs[1]] == [10, 20, 30]
    for a, b in zip(*logs, strict=True):
        for key in ("loss_g", "loss_fake", "score_gap"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
        # the gradient norms, relative: summed instead of averaged, they would double
        for key in ("grad_norm_g", "grad_norm_fake"):
            assert a[key] > 0 and math.isclose(a[key], b[key], rel_tol=1e-4), (key, a[key], b[key])

    for node in ("node-001", "node-002"):
        worst = assert_close(
            weights(tmp_path / "one/nodes" / f"{node}.safetensors"),
            weights(tmp_path / "two/nodes" / f"{node}.safetensors"),
        )
        print(f"record {node}: max |1 process - 2 processes| = {worst:.2e}")
    for ref in ("generator", "generator_ema"):
        worst = assert_close(
            weights(backtrack_dir(tmp_path / "one", "single") / getattr(single, ref).file),
            weights(backtrack_dir(tmp_path / "one", "pair") / getattr(pair, ref).file),
        )
        print(f"backtrack {ref}: max |1 process - 2 processes| = {worst:.2e}")

    # A resumed 2-process run refuses another process count.
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "disback_cli",
            *BACKTRACK,
            "-T",
            "one",
            "--batch",
            "32",
            "--name",
            "pair",
            "--iters",
            "40",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 2 and "processes: 2 -> 1" in again.stderr


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_two_process_sampling_writes_the_same_files(tmp_path):
    sample = [
        "sample",
        "--teacher",
        "builtin:digits",
        "--steps",
        "3",
        "--seeds",
        "5-41",
        "--batch",
        "8",
        "--device",
        "cpu",
    ]
    one = disback(
        *sample,
        "--format",
        "png",
        "--out",
        "one",
        "--grid-out",
        "one.png",
        cwd=tmp_path,
        fresh=True,
    )
    two = disback(
        *sample,
        "--format",
        "png",
        "--out",
        "two",
        "--grid-out",
        "two.png",
        processes=2,
        cwd=tmp_path,
    )
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert len(list((tmp_path / "two").rglob("*.png"))) == 37
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    assert one.stdout.count("wrote 37 samples") == two.stdout.count("wrote 37 samples") == 1
    disback(*sample, "--format", "npz", "--out", "one.npz", cwd=tmp_path, fresh=True)
    disback(*sample, "--format", "npz", "--out", "two.npz", processes=2, cwd=tmp_path)
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()


def test_two_process_evaluation_gives_the_same_report(tmp_path):
    """Inception features split across 2 ranks (a TorchScript stand-in for the real network,
    trusted in the subprocesses through a sitecustomize hook) give rank 0 the same report."""
    import numpy as np
    from test_fid import StandInInception, images_like, write_folder, write_npz

    from disback_cli.store.fileio import sha256_file

    detector = tmp_path / "stand-in.pt"
    torch.jit.script(StandInInception()).save(str(detector))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import disback_cli.evaluation.detectors\n"
        f"disback_cli.evaluation.detectors.INCEPTION_SHA256 = {sha256_file(detector)!r}\n"
    )
    env = checkout_env(hook, OMP_NUM_THREADS="1", DISBACK_INCEPTION=str(detector))
    write_folder(tmp_path / "real", images_like(30, 1))
    write_npz(tmp_path / "fake.npz", images_like(37, 2))

    def run(processes: int, *args: str) -> subprocess.CompletedProcess:
        common = ("--batch", "4", "--device", "cpu")
        # A fresh interpreter even for one process: `env`'s sitecustomize hook trusts the stand-in.
        result = launch(tmp_path, *args, *common, processes=processes, env=env, fresh=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run(1, "evaluate", "ref", "real", "--out", "ref1.npz")
    run(2, "evaluate", "ref", "real", "--out", "ref2.npz")
    with np.load(tmp_path / "ref1.npz") as a, np.load(tmp_path / "ref2.npz") as b:
        for key in ("mu", "sigma", "features"):
            np.testing.assert_array_equal(a[key], b[key])
    reports = [
        json.loads(
            run(k, "evaluate", "fake.npz", "--ref", "ref1.npz", "--repeats", "2", "--json").stdout
        )
        for k in (1, 2)
    ]
    assert reports[0]["results"] == reports[1]["results"]
    assert reports[0]["repeats"] == 2 and reports[0]["results"][0]["kid"] is not None


def test_diffratio_under_two_processes_matches_one_process(tmp_path):
    """DiffRatio's ratio network and its data batches follow the same global-batch rule."""
    disback(*RECORD, "--batch", "64", "--out", "one", cwd=tmp_path)
    ratio = ["--loss", "diffratio", "--data", "builtin:ring2d", "--iters", "20"]
    disback(*BACKTRACK, *ratio, "-T", "one", "--batch", "64", "--name", "single", cwd=tmp_path)
    disback(
        *BACKTRACK,
        *ratio,
        "-T",
        "one",
        "--batch",
        "32",
        "--name",
        "pair",
        processes=2,
        cwd=tmp_path,
    )
    logs = [
        [
            json.loads(line)
            for line in (backtrack_dir(tmp_path / "one", n) / "metrics.jsonl")
            .read_text()
            .splitlines()
        ]
        for n in ("single", "pair")
    ]
    assert [r["iteration"] for r in logs[0]] == [r["iteration"] for r in logs[1]] == [10, 20]
    for a, b in zip(*logs, strict=True):
        for key in ("loss_g", "loss_fake", "score_gap", "grad_norm_g", "grad_norm_fake"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])
    single, pair = (
        read_manifest(backtrack_dir(tmp_path / "one", n), BacktrackManifest)
        for n in ("single", "pair")
    )
    runs = {n: backtrack_dir(tmp_path / "one", n) for n in ("single", "pair")}
    assert_close(
        weights(runs["single"] / single.generator.file), weights(runs["pair"] / pair.generator.file)
    )
