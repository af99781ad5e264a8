"""`disback doctor`: a short self-check of the machine a run will use, to attach to bug reports.

Each check exercises something training relies on, on the chosen device, with a DDPM++ U-Net
(EDM's CIFAR-10 configuration on CUDA; a small one on the CPU, so the checks take seconds): bf16
autocast against fp32, torch.compile and channels-last against eager, the speed of one backtrack
iteration, and a 2-process gradient all-reduce against one process. A check ends `ok`, `failed`
(with the reason) or `skipped`; a check that raises is reported as failed and the others still run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from disback_cli import __version__
from disback_cli.config import BacktrackConfig
from disback_cli.method.dsm import denoising_step
from disback_cli.method.generator import OneStepGenerator
from disback_cli.method.losses import generator_step, make_generator_loss
from disback_cli.method.noise import TrainingSigma
from disback_cli.models.conditioning import condition_source
from disback_cli.models.networks import NetworkSpec, build_denoiser
from disback_cli.runtime.parallel import Execution, shutdown

BF16_TOLERANCE = 0.05
"""Relative error allowed between bf16-autocast and fp32 outputs. bf16 keeps 8 significant bits
(round-off 2^-9, about 0.2 % per operation), which adds up to about 1 % through a U-Net; a wrong
cast or an overflow shows as tens of percent or NaN."""
FP32_TOLERANCE = 1e-3
"""Relative error allowed for compiled or channels-last outputs against eager fp32 ones. Other
kernels sum in another order (about 1e-6; TF32 is off during the checks); a wrong memory layout
or a miscompiled kernel shows as order 1."""
ALLREDUCE_TOLERANCE = 1e-4
"""Relative error allowed between the average of two half-batch gradients and the full-batch
gradient. Only fp32 round-off separates them: about 1e-6 on the CPU, somewhat more where cuDNN
picks other convolution algorithms for the half batch; a missed bucket or a sum instead of a mean
is at least 1e-1."""
DATA_PARALLEL_TIMEOUT = 60.0  # seconds for the 2 processes to start, meet and finish
SIGMA_INIT = 2.5  # the generator's input noise level, as `record` defaults it

Status = Literal["ok", "failed", "skipped"]

# EDM's CIFAR-10 DDPM++ network (`--arch=ddpmpp`: SongUNet, Karras et al. 2022, Table 7).
CIFAR_UNET: dict[str, Any] = dict(
    model_channels=128,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    embedding_type="positional",
    encoder_type="standard",
    decoder_type="standard",
    channel_mult_noise=1,
    resample_filter=[1, 1],
)
SMALL_UNET: dict[str, Any] = {
    **CIFAR_UNET,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [8],
}


@dataclass(frozen=True)
class Check:
    """The outcome of one check: `detail` is the reason (failed, skipped) or the measurements."""

    name: str
    status: Status
    detail: str
    numbers: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, **self.numbers}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Check:
        numbers = {k: v for k, v in data.items() if k not in ("name", "status", "detail")}
        return cls(data["name"], data["status"], data["detail"], numbers)


@dataclass(frozen=True)
class Workload:
    """The network and batch sizes the checks run with."""

    spec: NetworkSpec
    batch: int  # comparisons, and the global batch of the data-parallel check
    step_batch: int  # backtrack iterations
    warmup: int  # backtrack iterations before timing
    measured: int  # timed backtrack iterations

    @classmethod
    def for_device(cls, device: torch.device) -> Workload:
        """EDM's CIFAR-10 network at batch 64 on CUDA; a small one on the CPU."""
        if device.type == "cuda":
            spec = NetworkSpec(
                arch="SongUNet", arch_kwargs=CIFAR_UNET, data_shape=(3, 32, 32), label_dim=10
            )
            return cls(spec, batch=64, step_batch=64, warmup=3, measured=10)
        spec = NetworkSpec(
            arch="SongUNet", arch_kwargs=SMALL_UNET, data_shape=(3, 16, 16), label_dim=10
        )
        return cls(spec, batch=4, step_batch=8, warmup=1, measured=3)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "spec": self.spec.model_dump(mode="json")})

    @classmethod
    def from_json(cls, text: str) -> Workload:
        data = json.loads(text)
        return cls(**{**data, "spec": NetworkSpec.model_validate(data["spec"])})

    def describe(self) -> str:
        kwargs = self.spec.arch_kwargs
        shape = "x".join(map(str, self.spec.data_shape))
        return (
            f"SongUNet (DDPM++) model_channels {kwargs['model_channels']}, channel_mult "
            f"{kwargs['channel_mult']}, num_blocks {kwargs['num_blocks']}, data {shape}, "
            f"{self.spec.label_dim} classes; batch {self.batch}, backtrack batch {self.step_batch}"
        )

    def network(self, device: torch.device, seed: int = 0) -> nn.Module:
        """The same random weights for the same seed, in every process, in eval mode (no dropout:
        outputs are deterministic). Every weight is redrawn because EDM initialises the output
        layers near zero, which would make any comparison of outputs trivially pass."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_denoiser(self.spec)
            with torch.no_grad():
                for p in model.parameters():
                    if p.ndim >= 2:
                        p.normal_(0, 1 / math.sqrt(p[0].numel()))
        return model.to(device).eval()

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noisy images at noise levels from 0.5 to 80, where the network rather than the skip
        connection makes most of the denoiser's output, and one-hot class labels."""
        rng = torch.Generator().manual_seed(1)
        n, shape = self.batch, (self.batch, *self.spec.data_shape)
        sigma = torch.logspace(math.log10(0.5), math.log10(80.0), n)
        clean = 0.5 * torch.randn(shape, generator=rng)
        x = clean + sigma.view(-1, 1, 1, 1) * torch.randn(shape, generator=rng)
        labels = nn.functional.one_hot(
            torch.arange(n) % self.spec.label_dim, self.spec.label_dim
        ).float()
        return x.to(device), sigma.to(device), labels.to(device)


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


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference|| / ||reference|| in float64 (NaN when either is not finite)."""
    reference, other = reference.detach().double(), other.detach().double()
    scale = reference.norm().item()
    difference = (other - reference).norm().item()
    return difference / scale if scale else (0.0 if difference == 0 else math.inf)


def _agreement(name: str, error: float, tolerance: float, what: str, **numbers: float) -> Check:
    numbers = {"relative_error": error, "tolerance": tolerance, **numbers}
    status: Status = "ok" if error <= tolerance else "failed"  # NaN fails
    relation = "<=" if status == "ok" else "exceeds"
    return Check(
        name, status, f"{what}: relative error {error:.2e} {relation} {tolerance:g}", numbers
    )


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off while checking, so fp32 results differ only by round-off (cuDNN allows TF32
    convolutions by default; runs turn it on only with --tf32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_backward(
    model: nn.Module, inputs: tuple, ex: Execution
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and parameter gradients of the mean squared output, as a run computes them."""
    model.zero_grad(set_to_none=True)
    with ex.autocast():
        out = model(*inputs)
    out.float().square().mean().backward()
    return out.detach().float(), [
        p.grad.detach().clone() for p in model.parameters() if p.grad is not None
    ]


def check_bf16(work: Workload, device: torch.device) -> Check:
    """Forward and backward in fp32 and under bf16 autocast (fp32 weights, as `--precision bf16`
    runs): outputs within BF16_TOLERANCE of each other, every gradient finite."""
    model, inputs = work.network(device), work.inputs(device)
    out32, grads32 = _forward_backward(model, inputs, Execution(device, "fp32"))
    out16, grads16 = _forward_backward(model, inputs, Execution(device, "bf16"))
    grad_error = relative_error(_flat(grads32), _flat(grads16))
    if not all(bool(torch.isfinite(g).all()) for g in (*grads32, *grads16)):
        return Check(
            "bf16",
            "failed",
            "non-finite gradients in fp32 or bf16",
            {"gradient_relative_error": grad_error},
        )
    return _agreement(
        "bf16",
        relative_error(out32, out16),
        BF16_TOLERANCE,
        "bf16 vs fp32 output, gradients finite",
        gradient_relative_error=grad_error,
    )


def check_compile(work: Workload, device: torch.device) -> Check:
    """torch.compile (DISBACK_COMPILE_BACKEND, default inductor, as --compile uses) gives the
    eager output within FP32_TOLERANCE."""
    backend = os.environ.get("DISBACK_COMPILE_BACKEND", "inductor")
    model, inputs = work.network(device), work.inputs(device)
    with torch.no_grad():
        eager = model(*inputs)
        started = time.perf_counter()
        compiled = torch.compile(model, backend=backend)(*inputs)
        _sync(device)
        seconds = time.perf_counter() - started
    return _agreement(
        "compile",
        relative_error(eager, compiled),
        FP32_TOLERANCE,
        f"{backend}, built in {seconds:.1f} s, vs eager",
        compile_seconds=seconds,
    )


def check_channels_last(work: Workload, device: torch.device) -> Check:
    """Channels-last weights and inputs (as --channels-last prepares them) give the normal output
    within FP32_TOLERANCE."""
    model, (x, sigma, labels) = work.network(device), work.inputs(device)
    ex = Execution(device, channels_last=True)
    with torch.no_grad():
        reference = model(x, sigma, labels)
        output = ex.prepare(model)(ex.to_input(x), sigma, labels)
    return _agreement(
        "channels-last",
        relative_error(reference, output),
        FP32_TOLERANCE,
        "channels-last vs contiguous output",
    )


def check_throughput(work: Workload, device: torch.device) -> Check:
    """Iterations per second of backtracking (one VSD generator step and one fake-score denoising
    step), in fp32, and on CUDA also in bf16."""
    precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    rates = {p: _backtrack_rate(work, Execution(device, p)) for p in precisions}
    shown = ", ".join(f"{p} {rate:.2f} it/s" for p, rate in rates.items())
    numbers = {f"it_per_s_{p}": rate for p, rate in rates.items()}
    if not all(math.isfinite(rate) for rate in rates.values()):
        return Check("throughput", "failed", f"non-finite losses ({shown})", numbers)
    return Check(
        "throughput",
        "ok",
        f"{shown}; an iteration is a generator step and a "
        f"fake-score step at batch {work.step_batch}",
        numbers,
    )


def _backtrack_rate(work: Workload, ex: Execution) -> float:
    """Iterations per second of `backtrack`'s loop body, or NaN if a loss is not finite."""
    device, spec = ex.device, work.spec
    cfg = BacktrackConfig(
        loss="vsd",
        p_mean=-1.2,
        p_std=1.2,
        dsm_sigma="lognormal",
        batch=work.step_batch,
        device=str(device),
    )
    loss_fn, levels = make_generator_loss(cfg), TrainingSigma.of(cfg)
    generator = OneStepGenerator(ex.prepare(build_denoiser(spec).to(device)), SIGMA_INIT)
    fake = ex.prepare(build_denoiser(spec).to(device))
    target = ex.prepare(build_denoiser(spec).to(device)).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-5, betas=cfg.betas)
    opt_f = torch.optim.Adam(fake.parameters(), lr=1e-5, betas=cfg.betas)
    rng = torch.Generator(device).manual_seed(0)
    shape, conditions = (cfg.batch, *spec.data_shape), condition_source(spec.label_dim)

    def iteration() -> torch.Tensor:
        out, _ = generator_step(
            generator, opt_g, loss_fn, fake, target, shape, conditions, rng, ex=ex
        )
        loss_fake, _ = denoising_step(fake, opt_f, generator, shape, conditions, levels, rng, ex=ex)
        return out.loss.detach() + loss_fake

    for _ in range(work.warmup):
        iteration()
    _sync(device)
    started = time.perf_counter()
    losses = torch.stack([iteration() for _ in range(work.measured)])
    _sync(device)
    rate = work.measured / (time.perf_counter() - started)
    return rate if bool(torch.isfinite(losses).all()) else math.nan


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().flatten().cpu() for t in tensors])


def gradients_match(
    averaged: list[torch.Tensor], full: list[torch.Tensor], tolerance: float = ALLREDUCE_TOLERANCE
) -> Check:
    """Gradients averaged over 2 processes (half the batch each) against the full-batch gradient
    of one process: equal up to round-off, as data-parallel runs are designed to be."""
    if len(averaged) != len(full) or any(
        a.shape != f.shape for a, f in zip(averaged, full, strict=True)
    ):
        return Check("data-parallel", "failed", "averaged gradients do not match the parameters")
    return _agreement(
        "data-parallel",
        relative_error(_flat(full), _flat(averaged)),
        tolerance,
        "2-process averaged vs 1-process gradients",
    )


def check_data_parallel(work: Workload, device: torch.device) -> Check:
    """Two processes (NCCL on GPUs 0 and 1, gloo on the CPU) each take half of the same global
    batch and average their gradients with `Execution.average_gradients`; rank 0 compares the
    result with the full-batch gradient (`gradients_match`)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return Check(
            "data-parallel", "skipped", f"needs 2 GPUs (found {torch.cuda.device_count()})"
        )
    if not (dist.is_available() and dist.is_backend_available(backend)):
        return Check("data-parallel", "failed", f"torch.distributed has no {backend} backend")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
    }
    with tempfile.TemporaryDirectory(prefix="disback-doctor-") as name:
        folder = Path(name)
        (folder / "workload.json").write_text(work.to_json())
        ranks = []
        for rank in range(2):
            with open(folder / f"rank-{rank}.log", "w") as log:
                ranks.append(
                    subprocess.Popen(
                        [sys.executable, "-c", RANK_COMMAND, str(rank), backend, name],
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
        return Check("data-parallel", "failed", errors[0])
    if killed:
        return Check(
            "data-parallel",
            "failed",
            f"2 {backend} processes did not finish within {DATA_PARALLEL_TIMEOUT:g} s",
        )
    return Check.from_json(reports[0])


RANK_COMMAND = (
    "import sys; from disback_cli.runtime.doctor import rank_main; rank_main(*sys.argv[1:])"
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


def rank_main(rank: str, backend: str, folder: str) -> None:
    """A process of `check_data_parallel`: writes rank 0's comparison, or any rank's error, to
    FOLDER/rank-N.json, so the parent can show it in one line."""
    try:
        work = Workload.from_json(Path(folder, "workload.json").read_text())
        check = _rank_gradients(int(rank), backend, work)
        report = check.to_json() if check is not None else {}
    except Exception as exc:  # reported by the parent as the check's failure
        report = {"error": f"rank {rank}: {one_line(exc)}"}
    Path(folder, f"rank-{rank}.json").write_text(json.dumps(report))
    if "error" in report:
        raise SystemExit(1)


def _rank_gradients(rank: int, backend: str, work: Workload) -> Check | None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, rank=rank, world_size=2, timeout=timedelta(seconds=DATA_PARALLEL_TIMEOUT)
    )
    try:
        with exact_fp32():
            model, inputs = work.network(device), work.inputs(device)
            ex = Execution(device, rank=rank, world_size=2)
            _forward_backward(model, tuple(ex.local(t) for t in inputs), ex)
            ex.average_gradients(model.parameters())
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown()  # its barrier: neither rank leaves the group while the other still uses it
    averaged = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    if rank != 0:
        return None
    with exact_fp32():
        _, full = _forward_backward(model, inputs, Execution(device))
    return gradients_match(averaged, full)


CHECKS: dict[str, Callable[[Workload, torch.device], Check]] = {
    "bf16": check_bf16,
    "compile": check_compile,
    "channels-last": check_channels_last,
    "throughput": check_throughput,
    "data-parallel": check_data_parallel,
}


def run_checks(work: Workload, device: torch.device, skip: Iterable[str] = ()) -> Iterator[Check]:
    """Every check in turn (yielded as it finishes); a check that raises is reported failed."""
    skip = set(skip)
    for name, check in CHECKS.items():
        if name in skip:
            yield Check(name, "skipped", "left out on request")
            continue
        try:
            with exact_fp32():
                result = check(work, device)
        except Exception as exc:  # a broken check is a finding, not a reason to stop the others
            result = Check(name, "failed", one_line(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield result
