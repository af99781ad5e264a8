"""`disback doctor`: a short self-check of the machine a run will use, to attach to bug reports.

Each check exercises something training relies on, on the chosen device, with a DDPM++ U-Net
(EDM's CIFAR-10 configuration on CUDA; a small one on the CPU, so the checks take seconds): bf16
autocast against fp32, torch.compile and channels-last against eager, the speed of one backtrack
iteration, and 2-process gradients (whole copies all-reduced, and FSDP2-sharded) against one
process. A check ends `ok`, `failed` (with the reason) or `skipped`; a check that raises is
reported as failed and the others still run. The single-process checks are in
`stages.doctor_checks`; the 2-process ones are here because their rank processes start from this
module (`RANK_COMMAND`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from disback_cli import __version__
from disback_cli.runtime.parallel import Execution, shutdown
from disback_cli.runtime.sharding import PARALLEL, blocks_of
from disback_cli.stages.doctor_checks import (
    Check,
    Workload,
    agreement,
    check_bf16,
    check_channels_last,
    check_compile,
    check_throughput,
    exact_fp32,
    flattened,
    forward_backward,
    relative_error,
)
from disback_cli.store.tensorfile import whole_tensor

ALLREDUCE_TOLERANCE = 1e-4
"""Relative error allowed between the average of two half-batch gradients and the full-batch
gradient. Only fp32 round-off separates them: about 1e-6 on the CPU, somewhat more where cuDNN
picks other convolution algorithms for the half batch; a missed bucket or a sum instead of a mean
is at least 1e-1."""
DATA_PARALLEL_TIMEOUT = 60.0  # seconds for the 2 processes to start, meet and finish


def one_line(exc: BaseException) -> str:
    """The innermost cause of an exception as `Type: message`, printable, the message cut after
    its first line that does not end in a colon (torch.compile's errors read "backend='inductor'
    raised:" and give the reason on the next line)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    head = []
    for line in filter(None, (line.strip() for line in str(exc).splitlines())):
        head.append(line)
        if not line.endswith(":"):
            break
    text = f"{type(exc).__name__}: {' '.join(head)}" if head else type(exc).__name__
    return "".join(c for c in text if c.isprintable())[:300]


def versions() -> dict[str, Any]:
    """What a bug report needs to know about the software and GPUs ("none" where absent)."""
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                {
                    "index": index,
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "disback": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(cudnn) if cudnn else "none",
        "gpus": gpus,
        "nccl": _nccl_version(),
        "platform": platform.platform(),
    }


def _nccl_version() -> str:
    if not (torch.cuda.is_available() and dist.is_available() and dist.is_nccl_available()):
        return "not available"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def gradients_match(
    averaged: list[torch.Tensor],
    full: list[torch.Tensor],
    tolerance: float = ALLREDUCE_TOLERANCE,
    name: str = "data-parallel",
) -> Check:
    """Gradients averaged over 2 processes (half the batch each) against the full-batch gradient
    of one process: equal up to round-off, as data-parallel runs are designed to be."""
    if len(averaged) != len(full) or any(
        a.shape != f.shape for a, f in zip(averaged, full, strict=True)
    ):
        return Check(name, "failed", "averaged gradients do not match the parameters")
    return agreement(
        name,
        relative_error(flattened(full), flattened(averaged)),
        tolerance,
        "2-process averaged vs 1-process gradients",
    )


def check_data_parallel(work: Workload, device: torch.device, parallel: str = "ddp") -> Check:
    """Two processes (NCCL on GPUs 0 and 1, gloo on the CPU) each take half of the same global
    batch, with whole copies of the network (`ddp`) or with it sharded by FSDP2 (`fsdp`), and
    average their gradients as a run does; rank 0 compares the (gathered) result with the
    full-batch gradient of one process (`gradients_match`)."""
    name = PARALLEL_CHECKS[parallel]
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return Check(name, "skipped", f"needs 2 GPUs (found {torch.cuda.device_count()})")
    if not (dist.is_available() and dist.is_backend_available(backend)):
        return Check(name, "failed", f"torch.distributed has no {backend} backend")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    with tempfile.TemporaryDirectory(prefix="disback-doctor-") as folder_name:
        folder = Path(folder_name)
        (folder / "workload.json").write_text(work.to_json())
        ranks, settings = [], (backend, folder_name, parallel)
        for rank in range(2):
            with open(folder / f"rank-{rank}.log", "w") as log:
                ranks.append(
                    subprocess.Popen(
                        [sys.executable, "-c", RANK_COMMAND, str(rank), *settings],
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        killed = _wait(ranks, DATA_PARALLEL_TIMEOUT)
        reports = [
            {} if process in killed else _rank_report(folder, rank, process)
            for rank, process in enumerate(ranks)
        ]
    errors = [report["error"] for report in reports if "error" in report]
    if errors:
        return Check(name, "failed", errors[0])
    if killed:
        return Check(
            name,
            "failed",
            f"2 {backend} processes did not finish within {DATA_PARALLEL_TIMEOUT:g} s",
        )
    return Check.from_json(reports[0])


PARALLEL_CHECKS = {"ddp": "data-parallel", "fsdp": "fsdp"}  # check name of each layout
RANK_COMMAND = (
    "import sys; from disback_cli.stages.doctor import rank_main; rank_main(*sys.argv[1:])"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(processes: list[subprocess.Popen], timeout: float) -> list[subprocess.Popen]:
    """Wait for every process to exit, but stop at the first failure (the other one would wait
    for it in vain) or at the timeout; kill what is left, and return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in processes]
        if None not in codes or any(code not in (None, 0) for code in codes):
            break
        time.sleep(0.1)
    killed = [p for p in processes if p.poll() is None]
    for process in killed:
        process.kill()
        process.wait()
    return killed


def _rank_report(folder: Path, rank: int, process: subprocess.Popen) -> dict[str, Any]:
    """What the rank wrote, or for a rank that ended without a word, its exit and last output."""
    report = folder / f"rank-{rank}.json"
    if report.exists():
        return json.loads(report.read_text())
    lines = (folder / f"rank-{rank}.log").read_text(errors="replace").strip().splitlines()
    last = "".join(c for c in lines[-1] if c.isprintable())[:300] if lines else "no output"
    return {"error": f"rank {rank} exited with code {process.returncode}: {last}"}


def rank_main(rank: str, backend: str, folder: str, parallel: str = "ddp") -> None:
    """A process of `check_data_parallel`: writes rank 0's comparison, or any rank's error, to
    FOLDER/rank-N.json, so the parent can show it in one line."""
    try:
        work = Workload.from_json(Path(folder, "workload.json").read_text())
        check = _rank_gradients(int(rank), backend, work, parallel)
        report = check.to_json() if check is not None else {}
    except Exception as exc:  # reported by the parent as the check's failure
        report = {"error": f"rank {rank}: {one_line(exc)}"}
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(report))
    if "error" in report:
        raise SystemExit(1)


def _rank_gradients(rank: int, backend: str, work: Workload, parallel: str) -> Check | None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, rank=rank, world_size=2, timeout=timedelta(seconds=DATA_PARALLEL_TIMEOUT)
    )
    try:
        with exact_fp32():
            model, inputs = work.network(device), work.inputs(device)
            ex = Execution(
                device, rank=rank, world_size=2, layout=PARALLEL[parallel](device, rank, 2, None)
            )
            model = ex.layout.networks(model, blocks_of, device).adopt(model)
            forward_backward(model, tuple(ex.local(t) for t in inputs), ex)
            ex.average_gradients(model.parameters())
            averaged = [whole_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown()  # its barrier: neither rank leaves the group while the other still uses it
    if rank != 0:
        return None
    with exact_fp32():  # the same network, whole, on the whole batch
        _, full = forward_backward(work.network(device), inputs, Execution(device))
    return gradients_match(averaged, full, name=PARALLEL_CHECKS[parallel])


CHECKS: dict[str, Callable[[Workload, torch.device], Check]] = {
    "bf16": check_bf16,
    "compile": check_compile,
    "channels-last": check_channels_last,
    "throughput": check_throughput,
    "data-parallel": check_data_parallel,
    "fsdp": functools.partial(check_data_parallel, parallel="fsdp"),
}


# What a check costs before it says anything, told before it starts (measured on 2 CPU cores).
SLOW_CHECKS = {
    "compile": "torch.compile builds its kernels first: minutes on a CPU (245 s measured), "
    "about a minute on a GPU; --skip compile leaves it out",
}


def run_checks(
    work: Workload,
    device: torch.device,
    skip: Iterable[str] = (),
    announce: Callable[[str], None] = lambda text: None,
) -> Iterator[Check]:
    """Every check in turn (yielded as it finishes); a check that raises is reported failed. A
    slow check is `announce`d before it starts."""
    skip = set(skip)
    for name, check in CHECKS.items():
        if name in skip:
            yield Check(name, "skipped", "left out on request")
            continue
        if name in SLOW_CHECKS:
            announce(f"{name}: {SLOW_CHECKS[name]}")
        try:
            with exact_fp32():
                result = check(work, device)
        except Exception as exc:  # a broken check is a finding, not a reason to stop the others
            result = Check(name, "failed", one_line(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield result
