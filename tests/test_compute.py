"""Precision, compilation, memory layout and path-node prefetching, exercised on the CPU."""

from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import safetensors
import torch
from first_iteration import first_iteration

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.models import path_nodes
from disback_cli.models.denoiser_files import load_denoiser
from disback_cli.models.networks.layers import Conv2d
from disback_cli.models.path_nodes import PathNodes
from disback_cli.models.teachers import open_teacher
from disback_cli.runtime.parallel import Execution
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest
from disback_cli.store.manifests import read_manifest as read

SMALL = dict(iters=30, interval=10, batch=64, save_every=10, log_every=10, device="cpu")


@pytest.fixture
def trajectory(small_trajectory, tmp_path):
    shutil.copytree(small_trajectory, tmp_path / "t")
    return tmp_path / "t"


def final_generator(trajectory, name) -> dict[str, torch.Tensor]:
    run = backtrack_dir(trajectory, name)
    return load_denoiser(run / read(run, BacktrackManifest).generator.file).denoiser.state_dict()


def first_conv(module: torch.nn.Module) -> Conv2d:
    return next(m for m in module.modules() if isinstance(m, Conv2d) and m.weight is not None)


def test_bf16_autocast_runs_the_networks_in_bf16_and_keeps_fp32_weights(trajectory):
    teacher = open_teacher("builtin:digits")
    seen = []
    conv = first_conv(teacher.denoiser)
    conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 1, 8, 8)
    with Execution(torch.device("cpu"), "bf16").autocast():
        out = teacher.denoiser(x, torch.full((2,), 0.5))
    assert seen == [torch.bfloat16] and out.dtype == torch.float32  # fp32 at the output

    run_backtrack(BacktrackConfig(**SMALL), trajectory, "fp32")
    run_backtrack(BacktrackConfig(**SMALL, precision="bf16"), trajectory, "bf16")
    a, b = final_generator(trajectory, "fp32"), final_generator(trajectory, "bf16")
    assert all(t.dtype == torch.float32 for t in b.values())
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    assert 0 < difference < 0.02 * scale  # bf16 round-off shows, but it is the same training


class Phases(SilentReporter):
    def __init__(self) -> None:
        self.said: list[str] = []

    def phase(self, text: str) -> None:
        self.said.append(text)


def test_compiled_networks_give_the_same_run(trajectory, monkeypatch):
    monkeypatch.setenv("DISBACK_COMPILE_BACKEND", "aot_eager")  # inductor needs minutes here
    phases = {"eager": Phases(), "compiled": Phases()}
    cfg = BacktrackConfig(**{**SMALL, "iters": 20})
    run_backtrack(cfg, trajectory, "eager", reporter=phases["eager"])
    compiled = cfg.model_copy(update={"compile": True})
    run_backtrack(compiled, trajectory, "compiled", reporter=phases["compiled"])
    said = "compiling the networks (torch.compile: minutes on a CPU)"
    assert said in phases["compiled"].said and said not in phases["eager"].said  # said first
    a, b = final_generator(trajectory, "eager"), final_generator(trajectory, "compiled")
    assert a.keys() == b.keys()  # compiled in place: file layout unchanged
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_channels_last_images_give_the_same_outputs():
    teacher = open_teacher("builtin:digits")
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7)
    reference = teacher.denoiser(x, sigma)
    ex = Execution(torch.device("cpu"), channels_last=True)
    ex.prepare(teacher.denoiser)
    conv = first_conv(teacher.denoiser)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(teacher.denoiser(ex.to_input(x), sigma), reference)


def test_bf16_node_files_halve_the_disk_and_load_as_fp32(small_trajectory, tmp_path):
    config = dict(teacher="builtin:ring2d", iters=60, nodes=3, batch=64, device="cpu")
    run_record(RecordConfig(**config, node_dtype="bf16"), tmp_path / "t")
    for node in ("node-001", "node-003"):
        small = tmp_path / "t" / "nodes" / f"{node}.safetensors"
        full = small_trajectory / "nodes" / f"{node}.safetensors"
        assert small.stat().st_size < 0.6 * full.stat().st_size
        with safetensors.safe_open(small, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
        loaded = load_denoiser(small).denoiser.state_dict()
        reference = load_denoiser(full).denoiser.state_dict()
        for key, value in loaded.items():
            assert value.dtype == torch.float32
            assert torch.equal(value, reference[key].to(torch.bfloat16).float())
    # trains from the bf16 nodes, as float32 networks: its first iteration is the one computed
    # from the nodes as `load_denoiser` reads them, and the targets walk the path as usual
    run_backtrack(BacktrackConfig(**{**SMALL, "log_every": 1}), tmp_path / "t")
    run = backtrack_dir(tmp_path / "t", "default")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["target_node"] for line in lines] == [2] * 10 + [1] * 10 + [0] * 10
    for key, value in first_iteration(tmp_path / "t", run).items():
        assert lines[0][key] == pytest.approx(value, rel=1e-5), key


def test_next_node_loads_in_the_background_and_old_targets_are_freed(trajectory, monkeypatch):
    traj = read(trajectory, TrajectoryManifest)
    teacher = open_teacher(traj.teacher.source)
    loads = []
    real = path_nodes.load_path_node

    def counting(trajectory, manifest, index, *args):
        loads.append(index)
        return real(trajectory, manifest, index, *args)

    monkeypatch.setattr(path_nodes, "load_path_node", counting)
    nodes = PathNodes(trajectory, traj, teacher, torch.device("cpu"))
    assert teacher.denoiser is None  # taken over: freed once node 0 is not the target
    alive, target = {}, None
    try:
        for index in (3, 2, 1, 0):
            target = None  # as the training loop does: drop the old target first
            target = nodes.target(index)
            alive[index] = weakref.ref(target)
            if index:
                assert nodes.pending[0] == index - 1  # the next node is on its way
                alive[index - 1] = weakref.ref(nodes.pending[1].result())
            gc.collect()
            live = sorted(i for i, ref in alive.items() if ref() is not None)
            assert live == sorted({index, max(index - 1, 0)})  # current target and next node
    finally:
        nodes.close()
    assert loads == [3, 2, 1]  # each node read once; node 0 read again from the teacher file


def test_compute_flags_reach_the_run_configuration(cli, tmp_path):
    result = cli(
        "record",
        "--teacher",
        "builtin:ring2d",
        "--out",
        tmp_path / "t",
        "--iters",
        "20",
        "--nodes",
        "2",
        "--batch",
        "32",
        "--precision",
        "bf16",
        "--node-dtype",
        "bf16",
        "--no-channels-last",
        "--tf32",
        "--quiet",
    )
    assert result.code == 0, result.stderr
    config = read(tmp_path / "t", TrajectoryManifest).config
    assert (config.precision, config.node_dtype, config.tf32, config.channels_last) == (
        "bf16",
        "bf16",
        True,
        False,
    )
    bad = cli("backtrack", "-T", tmp_path / "t", "--precision", "fp16")
    assert bad.code == 2 and "precision: Input should be 'fp32' or 'bf16'" in bad.stderr
