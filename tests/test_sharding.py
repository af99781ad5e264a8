"""--parallel fsdp|hsdp: PyTorch FSDP2 on CPU with gloo, launched by torchrun as users launch it.

A sharded run computes what one process with the global batch computes (up to float round-off),
resumes exactly, reads path nodes by slices with their key set checked, and leaves generator files
that `sample` reads without a process group. The fixture teacher is an EDM pickle of a small
DDPM++ network (blocks FSDP shards one by one), trained with dropout 0: dropout draws from each
rank's own stream, so only without it does a K-process run equal one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from edm_fixtures import tiny_network, write_edm_snapshot
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from t2i_fixtures import make_sd_folder, write_prompts

from conftest import checkout_env, disback_launcher, launch, process_tree
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.runtime.sharding import local_rows, refuse_unsupported
from disback_cli.store.layout import BACKTRACK, TRAJECTORY, foreign_entries, remove_ours
from disback_cli.store.manifests import (
    BacktrackManifest,
    TrajectoryManifest,
    read_manifest,
    write_manifest,
)
from disback_cli.store.sharded_state import bundle_digest
from disback_cli.store.tensorfile import check_tensor_table

ENV = checkout_env(OMP_NUM_THREADS="1")
COMMON = ["--seed", "1", "--device", "cpu", "--dropout", "0", "--quiet"]
BACKTRACK_ARGS = [
    "backtrack",
    "-T",
    "traj",
    "--interval",
    "2",  # switches at iterations 2 and 4: node 1, then the teacher
    "--save-every",
    "3",
    "--log-every",
    "3",
    "--dsm-sigma",
    "lognormal",  # one recording serves the three losses
    *COMMON,
]
HANG = 600


def disback(
    *args: str, processes: int = 1, cwd: Path, check: bool = True
) -> subprocess.CompletedProcess:
    """`disback ARGS` in `cwd` (see `conftest.launch`), checked to succeed unless not `check`."""
    result = launch(cwd, *args, processes=processes, env=ENV, timeout=HANG)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with the teacher and two 2-node trajectories recorded by one process: `traj`
    with G0 the teacher's network, `student` with G0 a smaller random network."""
    root = tmp_path_factory.mktemp("sharding")
    net, init_kwargs = tiny_network("ddpmpp", "edm", label_dim=4)
    write_edm_snapshot(root / "teacher.pkl", net, init_kwargs)
    record = ["record", "--teacher", "teacher.pkl", "--iters", "6", "--nodes", "2"]
    disback(*record, "--batch", "8", "--out", "traj", *COMMON, cwd=root)
    student = ["--student-arch-kwargs", '{"model_channels": 8}', "--out", "student"]
    disback(*record, "--batch", "4", *student, *COMMON, cwd=root)
    return root


RUNS: dict[tuple, Path] = {}


def backtrack(
    work: Path, name: str, processes: int, *flags: str, iters: int = 6, trajectory: str = "traj"
) -> Path:
    """The run `name` (once per module): per-rank batch 4 / processes, i.e. global batch 4."""
    key = (name, processes, flags, iters, trajectory)
    if key not in RUNS:
        batch = str(4 // processes) if processes <= 4 else "1"
        disback(
            *[trajectory if arg == "traj" else arg for arg in BACKTRACK_ARGS],
            "--iters",
            str(iters),
            "--batch",
            batch,
            "--name",
            name,
            *flags,
            processes=processes,
            cwd=work,
        )
        RUNS[key] = work / trajectory / "backtrack" / name
    return RUNS[key]


def generator_weights(run: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"generator-{step:08d}.safetensors")


def assert_relatively_close(a: dict, b: dict, tolerance: float = 1e-5) -> float:
    """Every value within `tolerance` of the network's largest value (a tensor that starts at
    zero holds round-off-sized values after a few steps, so it is no scale of its own); returns
    the worst ratio."""
    assert a.keys() == b.keys()
    scale = max(value.abs().max().item() for value in a.values())
    worst = max((a[key] - b[key]).abs().max().item() for key in a) / scale
    assert worst <= tolerance, worst
    return worst


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def state_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"state-{step:08d}.dcp"
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                tensors[f"{file.name}:{key}"] = f.get_tensor(key)
    return tensors


@pytest.mark.parametrize(
    ("loss", "trajectory"), [("vsd", "traj"), ("dmd", "traj"), ("sid", "student")]
)
def test_fsdp_on_two_processes_equals_one_process(work, loss, trajectory):
    """Generator, EMA and every logged value after 6 iterations across two target switches; for
    sid with a G0 whose network is not the teacher's (a smaller random student)."""
    flags = ("--loss", loss)
    one = backtrack(work, f"one-{loss}", 1, *flags, trajectory=trajectory)
    two = backtrack(work, f"fsdp-{loss}", 2, *flags, "--parallel", "fsdp", trajectory=trajectory)
    manifest = read_manifest(two, BacktrackManifest)
    assert manifest.config.parallel == "fsdp" and manifest.world_size == 2
    assert manifest.state.file == "checkpoints/state-00000006.dcp"
    worst = assert_relatively_close(generator_weights(one), generator_weights(two))
    ema = "checkpoints/generator-ema-00000006.safetensors"
    assert_relatively_close(load_file(one / ema), load_file(two / ema))
    print(f"{loss}: worst relative difference {worst:.1e}")
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert a["target_node"] == b["target_node"]
        for key in ("loss_g", "loss_fake", "grad_norm_g", "grad_norm_fake"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_fsdp_on_a_stable_diffusion_folder_equals_one_process(tmp_path):
    """A diffusers UNet sharded per ResNet block and transformer layer, with guidance on the
    target and text conditions, across a target switch: dmd, as the SD recipes run it."""
    make_sd_folder(tmp_path / "sd")
    write_prompts(tmp_path / "prompts.txt")
    disback(
        "record",
        "--teacher",
        "sd",
        "--prompts",
        "prompts.txt",
        "--iters",
        "4",
        "--nodes",
        "2",
        "--batch",
        "4",
        "--out",
        "traj",
        *COMMON,
        cwd=tmp_path,
    )
    recorded_levels = BACKTRACK_ARGS.index("--dsm-sigma")  # the path's own (discrete) levels
    args = [*BACKTRACK_ARGS[:recorded_levels], *BACKTRACK_ARGS[recorded_levels + 2 :]]
    args += ["--loss", "dmd", "--iters", "4"]
    disback(*args, "--batch", "4", "--name", "one", cwd=tmp_path)
    disback(*args, "--batch", "2", "--name", "two", "--parallel", "fsdp", processes=2, cwd=tmp_path)
    one, two = (tmp_path / "traj/backtrack" / name for name in ("one", "two"))
    start = load_file(tmp_path / "sd/unet/diffusion_pytorch_model.safetensors")
    start = {f"model.unet.{key}": value for key, value in start.items()}  # G0 is the teacher's UNet
    assert_same_update(generator_weights(one, 4), generator_weights(two, 4), start)


def assert_same_update(a: dict, b: dict, start: dict, tolerance: float = 1e-2) -> None:
    """The two runs' weights differ by under `tolerance` of how far training moved them (L2 over
    the network). Not per element: Adam scales each element's step by its own gradient's size, so
    an element whose gradient is round-off steps by a full learning rate, with round-off's sign
    (measured: 1.02e-5 of the largest weight on one element, 2e-3 of the update overall; a missed
    all-reduce moves every element)."""
    assert a.keys() == b.keys() == start.keys()
    difference = sum(((a[key] - b[key]).double() ** 2).sum() for key in a) ** 0.5
    update = sum(((a[key] - start[key]).double() ** 2).sum() for key in a) ** 0.5
    assert update > 0 and difference <= tolerance * update, (difference, update)


def head_flags(work: Path) -> tuple[str, ...]:
    """DMD2's head with f-distill on a folder of 8 labelled random images (made once)."""
    folder = work / "real"
    if not folder.exists():
        folder.mkdir()
        generator = np.random.default_rng(0)
        for i in range(8):
            pixels = generator.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
        labels = [[f"{i}.png", i % 4] for i in range(8)]
        (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return ("--loss", "dmd", "--adversary", "dmd2", "--data", str(folder), "--f-divergence", "kl")


def test_fsdp_with_the_classifier_head_and_f_distill_equals_one_process(work):
    """The fake score's features through its sharded forward, the head sharded as one unit
    (its gradients reduced, its file gathered), f-distill's batch mean over the processes."""
    flags = head_flags(work)
    one = backtrack(work, "head-one", 1, *flags)
    two = backtrack(work, "head-fsdp", 2, *flags, "--parallel", "fsdp")
    assert_relatively_close(generator_weights(one), generator_weights(two))
    head = "checkpoints/head-00000006.safetensors"
    assert_relatively_close(load_file(one / head), load_file(two / head))
    for a, b in zip(metrics(one), metrics(two), strict=True):
        for key in ("loss_disc", "loss_gan_g"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        # sqrt(mean w^2 - 1) for weights of mean 1: the difference cancels most digits
        assert b["ratio_weight_std"] == pytest.approx(a["ratio_weight_std"], rel=1e-3)


def test_a_sharded_run_with_the_head_resumed_at_a_resume_point_equals_one_run(work):
    """Stopped at iteration 3 (a resume point between the two target switches) and extended to
    6 on two processes: the head's shards and Adam moments come back from the sharded state, so
    generator, EMA, head, the state's tensors and every logged value are the uninterrupted
    sharded run's, bit for bit."""
    flags = (*head_flags(work), "--parallel", "fsdp")
    straight = backtrack(work, "head-fsdp", 2, *flags)
    resumed = backtrack(work, "head-resumed", 2, *flags, iters=3)
    assert read_manifest(resumed, BacktrackManifest).state.file.endswith("00000003.dcp")
    again = [*BACKTRACK_ARGS, *flags, "--iters", "6", "--batch", "2", "--name", "head-resumed"]
    summary = json.loads(disback(*again, "--json", processes=2, cwd=work).stdout)
    assert summary["resumed_from"] == 3 and summary["iterations_run"] == 3
    manifest = read_manifest(resumed, BacktrackManifest)
    assert manifest.state.file == "checkpoints/state-00000006.dcp"
    assert manifest.head.file == "checkpoints/head-00000006.safetensors"
    for kind in ("generator", "generator-ema", "head"):
        file = f"checkpoints/{kind}-00000006.safetensors"
        assert (straight / file).read_bytes() == (resumed / file).read_bytes(), kind
    a, b = state_tensors(straight, 6), state_tensors(resumed, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda run: [  # noqa: E731
        {k: v for k, v in line.items() if k != "seconds"} for line in metrics(run)
    ]
    lines = timeless(resumed)
    assert lines == timeless(straight) and [line["iteration"] for line in lines] == [3, 6]
    assert all("loss_disc" in line and "ratio_weight_std" in line for line in lines)


def test_hsdp_on_four_processes_equals_one_process(work):
    """Sharded over pairs and replicated across the two pairs (a 2 x 2 mesh)."""
    one = backtrack(work, "one-vsd", 1, "--loss", "vsd")
    four = backtrack(work, "hsdp", 4, "--loss", "vsd", "--parallel", "hsdp", "--shard-size", "2")
    assert read_manifest(four, BacktrackManifest).world_size == 4
    assert_relatively_close(generator_weights(one), generator_weights(four))


def test_bf16_frozen_copies_round_the_targets_only(work):
    """--frozen-dtype bf16 holds the teacher and targets as bf16 shards computed in float32: the
    generator stays near the float32 run's (the targets' weights rounded to bf16's 8 bits) and
    is not equal to it (the rounding reached the targets)."""
    one = backtrack(work, "one-vsd", 1, "--loss", "vsd")
    bf16 = backtrack(
        work, "fsdp-bf16", 2, "--loss", "vsd", "--parallel", "fsdp", "--frozen-dtype", "bf16"
    )
    assert read_manifest(bf16, BacktrackManifest).config.frozen_dtype == "bf16"
    worst = assert_relatively_close(generator_weights(one), generator_weights(bf16), 1e-2)
    assert worst > 1e-6, worst
    print(f"bf16 frozen copies: worst relative difference {worst:.1e}")


def test_fsdp_refuses_a_changed_layout_or_process_count(work):
    backtrack(work, "fsdp-vsd", 2, "--loss", "vsd", "--parallel", "fsdp")
    base = [*BACKTRACK_ARGS, "--loss", "vsd", "--name", "fsdp-vsd", "--iters", "9"]
    ddp = disback(*base, "--batch", "4", cwd=work, check=False)
    assert ddp.returncode == 2 and "parallel: 'fsdp' -> 'ddp'" in ddp.stderr
    hsdp = ("--loss", "vsd", "--parallel", "hsdp", "--shard-size", "2")
    backtrack(work, "hsdp", 4, *hsdp)  # the 4-process run of the hsdp test
    again = [*BACKTRACK_ARGS, *hsdp, "--name", "hsdp", "--iters", "9", "--batch", "2"]
    two = disback(*again, processes=2, cwd=work, check=False)
    # torchrun exits 1 whatever its workers' codes (2 here, printed by its agent)
    assert two.returncode != 0 and "processes: 4 -> 2 (global batch)" in two.stderr
    alone = disback(*base, "--batch", "4", "--parallel", "fsdp", cwd=work, check=False)
    assert alone.returncode == 2
    assert alone.stderr.count("\n") == 1 and "launch with torchrun" in alone.stderr
    whole = [*BACKTRACK_ARGS, "--name", "whole-bf16", "--iters", "2", "--frozen-dtype", "bf16"]
    bf16 = disback(*whole, "--batch", "4", cwd=work, check=False)
    assert bf16.returncode == 2 and bf16.stderr.count("\n") == 1
    assert "needs --parallel fsdp|hsdp" in bf16.stderr
    assert not (work / "traj/backtrack/whole-bf16").exists()


def test_a_tampered_shard_is_refused_before_it_is_read(work, tmp_path):
    backtrack(work, "fsdp-vsd", 2, "--loss", "vsd", "--parallel", "fsdp")
    copy = tmp_path / "work"
    subprocess.run(["cp", "-r", str(work), str(copy)], check=True)
    shard = next((copy / "traj/backtrack/fsdp-vsd/checkpoints/state-00000006.dcp").glob("shard-*"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    out = disback(
        *BACKTRACK_ARGS,
        "--loss",
        "vsd",
        "--name",
        "fsdp-vsd",
        "--iters",
        "9",
        "--batch",
        "2",
        "--parallel",
        "fsdp",
        processes=2,
        cwd=copy,
        check=False,
    )
    assert out.returncode != 0 and "sha256 differs from the manifest" in out.stderr
    assert "disback_cli/" not in out.stderr  # no traceback of ours (torchrun prints its own)
    assert not (
        copy / "traj/backtrack/fsdp-vsd/checkpoints/generator-00000009.safetensors"
    ).exists()


def test_a_changed_node_changes_the_sharded_result(work, tmp_path):
    """The nodes a sharded run reads are the ones on disk: node 1 with one tensor scaled (and the
    manifest's sha256 updated to match) gives another generator."""
    reference = backtrack(work, "fsdp-vsd", 2, "--loss", "vsd", "--parallel", "fsdp")
    copy = tmp_path / "work"
    subprocess.run(["cp", "-r", str(work), str(copy)], check=True)
    subprocess.run(["rm", "-rf", str(copy / "traj/backtrack")], check=True)
    node = copy / "traj/nodes/node-001.safetensors"
    with safe_open(str(node), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k in sorted(tensors) if k.endswith("weight") and "enc" in k)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, str(node), metadata)
    manifest = read_manifest(copy / "traj", TrajectoryManifest)
    manifest.nodes[1].sha256 = hashlib.sha256(node.read_bytes()).hexdigest()
    write_manifest(copy / "traj", manifest)
    disback(
        *BACKTRACK_ARGS,
        "--loss",
        "vsd",
        "--name",
        "fsdp-vsd",
        "--iters",
        "6",
        "--batch",
        "2",
        "--parallel",
        "fsdp",
        processes=2,
        cwd=copy,
    )
    changed = generator_weights(copy / "traj/backtrack/fsdp-vsd")
    original = generator_weights(reference)
    assert any(not torch.equal(changed[k], original[k]) for k in original)


def test_sample_reads_a_sharded_run_without_a_process_group(work):
    run = backtrack(work, "fsdp-vsd", 2, "--loss", "vsd", "--parallel", "fsdp")
    out = disback(
        "sample",
        "-T",
        "traj",
        "--name",
        "fsdp-vsd",
        "-n",
        "4",
        "--out",
        "fsdp.npz",
        "--device",
        "cpu",
        "--quiet",
        cwd=work,
    )
    assert out.returncode == 0 and (work / "fsdp.npz").exists()
    assert read_manifest(run, BacktrackManifest).generator_ema is not None


def test_fsdp_record_equals_one_process_record(work, tmp_path):
    disback(
        "record",
        "--teacher",
        str(work / "teacher.pkl"),
        "--iters",
        "6",
        "--nodes",
        "2",
        "--batch",
        "4",
        "--save-every",
        "3",
        "--parallel",
        "fsdp",
        "--out",
        "sharded",
        *COMMON,
        processes=2,
        cwd=tmp_path,
    )
    for index in (1, 2):
        file = f"nodes/node-{index:03d}.safetensors"
        assert_relatively_close(
            load_file(work / "traj" / file), load_file(tmp_path / "sharded" / file)
        )
    one = read_manifest(work / "traj", TrajectoryManifest)
    two = read_manifest(tmp_path / "sharded", TrajectoryManifest)
    for a, b in zip(one.nodes, two.nodes, strict=True):
        assert b.g0_loss == pytest.approx(a.g0_loss, rel=1e-5)
    assert not (tmp_path / "sharded" / "state").exists()  # a complete recording keeps no state


def _saved_step(run: Path) -> int:
    try:
        manifest = read_manifest(run, BacktrackManifest)
    except Exception:  # not written yet, or being replaced this instant
        return 0
    return manifest.state.step if manifest.state else 0


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_sigkill_of_a_sharded_run_then_resume_is_exact(work):
    """Every process (launcher and workers) SIGKILLed at a seeded moment after the first resume
    point; the rerun resumes and ends with the uninterrupted run's files and state."""
    flags = ("--loss", "vsd", "--parallel", "fsdp")
    straight = backtrack(work, "fsdp-vsd", 2, *flags)  # resume points at 3 and 6
    launcher = disback_launcher(2)
    command = [
        *launcher,
        *BACKTRACK_ARGS,
        *flags,
        "--iters",
        "6",
        "--batch",
        "2",
        "--name",
        "killed",
    ]
    run = work / "traj" / "backtrack" / "killed"
    proc = subprocess.Popen(
        command,
        cwd=work,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + HANG
    while _saved_step(run) < 3:
        assert proc.poll() is None, "the run ended before its first resume point"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(7).uniform(0, 0.2))  # three iterations and a save are left
    assert proc.poll() is None, "the run ended before it could be killed"
    tree = process_tree(proc.pid)
    assert len(tree) >= 3  # the launcher and its two workers
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    while not all(_gone(pid) for pid in tree):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    saved = read_manifest(run, BacktrackManifest)
    assert saved.status != "complete" and saved.state.step % 3 == 0
    assert bundle_digest(run / saved.state.file) == saved.state.sha256
    disback(*command[len(launcher) :], processes=2, cwd=work)
    for kind in ("generator", "generator-ema"):
        file = f"checkpoints/{kind}-00000006.safetensors"
        assert (straight / file).read_bytes() == (run / file).read_bytes()
    # The sharded state too, tensor for tensor (its files' JSON headers may list the shards'
    # offsets in another order).
    a, b = state_tensors(straight, 6), state_tensors(run, 6)
    assert a.keys() == b.keys() and any(key.endswith("exp_avg_sq") for key in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run.rglob(".*.tmp"))


TURNS = """
import os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
from disback_cli.runtime.sharding import FullyShard

dist.init_process_group("gloo")
rank, folder = dist.get_rank(), Path(sys.argv[1])
def work():
    (folder / f"in-{rank}").touch()
    deadline = time.monotonic() + 1.0  # long enough for another reader to show up
    while time.monotonic() < deadline:
        inside = [p.name for p in folder.iterdir() if p.name.startswith("in-")]
        assert inside == [f"in-{rank}"], inside
        time.sleep(0.01)
    (folder / f"in-{rank}").rename(folder / f"done-{rank}")
    return rank
assert FullyShard(torch.device("cpu"), rank, 2, None).in_turns(work) == rank
dist.destroy_process_group()
"""


def test_the_processes_of_a_host_read_the_teacher_in_turns(tmp_path):
    """`in_turns` (how a sharded run reads its teacher) lets one process of a host work at a
    time: each one sees no other inside for a second, and every one gets its own result."""
    script = tmp_path / "turns.py"
    script.write_text(TURNS)
    launcher = [*disback_launcher(2)[:-2], str(script), str(tmp_path)]
    done = subprocess.run(launcher, env=ENV, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done-0", "done-1", "turns.py"]


# Units: slices, tensor tables, the folders of sharded resume points, refusals, memory plans.


def test_sharding_refuses_adapters_and_whole_copies_refuse_bf16_targets(work):
    from disback_cli.config import BacktrackConfig
    from disback_cli.method.fake_sides import make_fake_side
    from disback_cli.stages.backtrack import check_sharding
    from disback_cli.stages.trajectory import open_trajectory

    traj, teacher = open_trajectory(work / "traj", None, "cpu")

    def check(**fields):
        cfg = BacktrackConfig(**fields)
        check_sharding(cfg, traj, teacher, make_fake_side(cfg))

    check(parallel="fsdp", frozen_dtype="bf16")
    with pytest.raises(ConfigError, match="fsdp does not support --lora-rank"):
        check(parallel="fsdp", lora_rank=4)
    with pytest.raises(ConfigError, match="needs --parallel fsdp"):
        check(frozen_dtype="bf16")


def test_the_memory_plan_counts_copies_per_shard_and_bf16_targets_at_half(work):
    from types import SimpleNamespace

    from disback_cli.config import BacktrackConfig
    from disback_cli.method.fake_sides import make_fake_side
    from disback_cli.stages.backtrack import memory_plan
    from disback_cli.stages.trajectory import open_trajectory

    traj, teacher = open_trajectory(work / "traj", None, "cpu")
    copy_bytes = 4 * teacher.parameter_count

    def plan(shards: int, **fields):
        cfg = BacktrackConfig(**fields)
        ex = SimpleNamespace(layout=SimpleNamespace(shards=shards))
        return memory_plan(cfg, traj, teacher, make_fake_side(cfg), ex)

    whole = plan(1)  # generator 5 (weights, gradient, 2 moments, EMA), fake 4, 2 targets
    assert whole.count == 11 and whole.per_process() == 11 * copy_bytes
    sharded = plan(4, parallel="fsdp")  # + the teacher, read whole before it is sharded
    assert sharded.count == 11 and sharded.per_process() == 11 * copy_bytes // 4 + copy_bytes
    bf16 = plan(4, parallel="fsdp", frozen_dtype="bf16")  # the two targets at half size
    assert bf16.count == 10 and bf16.copies["target node (bf16)"] == 0.5
    assert "10 weight copies" in bf16.describe() and "0.5 target node (bf16)" in bf16.describe()


class _Shard:
    def __init__(self, dim: int = 0) -> None:
        self.dim = dim

    def is_shard(self) -> bool:
        return True


class _Replicate:
    def is_shard(self) -> bool:
        return False


class _Mesh:
    def __init__(self, sizes: tuple[int, ...], ranks: tuple[int, ...]) -> None:
        self.sizes, self.ranks = sizes, ranks

    def size(self, dim: int) -> int:
        return self.sizes[dim]

    def get_local_rank(self, dim: int) -> int:
        return self.ranks[dim]


class _Sharded:
    """What `local_rows` reads of a DTensor: its whole shape, placements and mesh position."""

    def __init__(self, rows: int, placements, mesh: _Mesh) -> None:
        self.shape, self.placements, self.device_mesh = (rows, 3), placements, mesh


@pytest.mark.parametrize("rows", [1, 5, 8, 13])
@pytest.mark.parametrize("shards", [2, 3, 4])
def test_local_rows_are_torch_chunk_pieces(rows, shards):
    """FSDP2 splits dim 0 as torch.chunk does; each process reads exactly its piece, also on a
    2-D (replicate, shard) mesh, where the replicate coordinate does not matter."""
    whole = torch.arange(rows * 3).reshape(rows, 3)
    pieces = list(whole.chunk(shards)) + [whole[:0]] * shards
    for rank in range(shards):
        part = whole[local_rows(_Sharded(rows, [_Shard()], _Mesh((shards,), (rank,))))]
        assert torch.equal(part, pieces[rank])
        hybrid = _Sharded(rows, [_Replicate(), _Shard()], _Mesh((2, shards), (1, rank)))
        assert torch.equal(whole[local_rows(hybrid)], pieces[rank])
    assert local_rows(torch.zeros(3)) == slice(None)
    with pytest.raises(DisbackError, match="dimension 1"):
        local_rows(_Sharded(4, [_Shard(1)], _Mesh((2,), (0,))))


class _Entry:
    def __init__(self, shape, dtype: str) -> None:
        self.shape, self.dtype = shape, dtype

    def get_shape(self):
        return list(self.shape)

    def get_dtype(self) -> str:
        return self.dtype


def test_a_node_table_must_match_the_network_key_by_key():
    expected = {"a.weight": torch.zeros(4, 2), "steps": torch.zeros(3, dtype=torch.int64)}
    good = {"a.weight": _Entry((4, 2), "BF16"), "steps": _Entry((3,), "I64")}
    check_tensor_table(Path("n"), expected, good)
    cases = [
        ({"a.weight": good["a.weight"]}, "1 missing, 0 unexpected: missing 'steps'"),
        ({**good, "b.bias": _Entry((1,), "F32")}, "0 missing, 1 unexpected: unexpected 'b.bias'"),
        ({**good, "a.weight": _Entry((2, 4), "F32")}, "a.weight has shape (2, 4)"),
        ({**good, "steps": _Entry((3,), "F32")}, "steps is F32, expected torch.int64"),
        ({**good, "a.weight": _Entry((4, 2), "I64")}, "a.weight is I64"),
    ]
    for table, message in cases:
        with pytest.raises(DisbackError, match=re.escape(message)):
            check_tensor_table(Path("n"), expected, table)


def test_sharded_resume_point_folders_are_ours_and_nothing_else(tmp_path):
    shard = "shard-00001-model-00001-of-00001.safetensors"
    assert BACKTRACK.owns(f"checkpoints/state-00000003.dcp/{shard}")
    assert BACKTRACK.owns("checkpoints/state-00000003.dcp/extra.json")
    assert not BACKTRACK.owns("checkpoints/state-00000003.dcp/notes.txt")
    assert not BACKTRACK.owns(f"checkpoints/generator-00000003.dcp/{shard}")
    assert TRAJECTORY.owns(f"state/record-00000003.dcp/{shard}")
    assert not TRAJECTORY.owns(f"nodes/record-00000003.dcp/{shard}")
    folder = tmp_path / "checkpoints" / "state-00000003.dcp"
    folder.mkdir(parents=True)
    (folder / shard).write_bytes(b"x")
    (folder / "extra.json").write_text("{}")
    temporary = tmp_path / "checkpoints" / ".state-00000006.dcp.ab12cd34.tmp"
    temporary.mkdir()
    (temporary / shard).write_bytes(b"y")
    assert foreign_entries(tmp_path, BACKTRACK, whole=False) == []
    (folder / "notes.txt").write_text("mine")
    (folder / "link.json").symlink_to(folder / "extra.json")
    assert foreign_entries(tmp_path, BACKTRACK, whole=False) == [
        "checkpoints/state-00000003.dcp/link.json",
        "checkpoints/state-00000003.dcp/notes.txt",
    ]
    with pytest.raises(DisbackError, match=r"'link\.json', which disback did not write"):
        bundle_digest(folder)
    gone = remove_ours(tmp_path, BACKTRACK)
    assert not temporary.exists()  # a killed save's folder goes entirely
    assert sorted(p.name for p in folder.iterdir()) == ["link.json", "notes.txt"]
    assert {p.name for p in gone} >= {shard, "extra.json", temporary.name}


def test_bundle_digest_covers_names_and_contents(tmp_path):
    (tmp_path / "extra.json").write_text("{}")
    shard = tmp_path / "shard-00001-model-00001-of-00001.safetensors"
    shard.write_bytes(b"abc")
    first = bundle_digest(tmp_path)
    shard.write_bytes(b"abd")
    second = bundle_digest(tmp_path)
    shard.rename(tmp_path / "shard-00002-model-00001-of-00001.safetensors")
    assert len({first, second, bundle_digest(tmp_path)}) == 3


class _Cfg:
    def __init__(self, parallel: str) -> None:
        self.parallel, self.sharded = parallel, parallel != "ddp"


def test_what_sharding_does_not_cover_is_refused_in_one_line():
    unsupported = [(False, "a"), (True, "--loss diffratio"), (True, "--eval-every")]
    with pytest.raises(ConfigError) as refused:
        refuse_unsupported(_Cfg("fsdp"), unsupported)
    assert str(refused.value) == (
        "--parallel fsdp does not support --loss diffratio yet; use --parallel ddp"
    )
    refuse_unsupported(_Cfg("ddp"), unsupported)  # whole copies support everything
    refuse_unsupported(_Cfg("hsdp"), [(False, "a")])
