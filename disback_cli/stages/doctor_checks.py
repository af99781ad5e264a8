"""What `disback doctor`'s checks are made of, and the checks that run in this one process.

Each check exercises something training relies on, on the chosen device, with a DDPM++ U-Net
(EDM's CIFAR-10 configuration on CUDA; a small one on the CPU, so the checks take seconds): bf16
autocast against fp32, torch.compile and channels-last against eager, and the speed of one
backtrack iteration. The 2-process data-parallel check and the run over all checks build on these
in `stages.doctor`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from disback_cli.config import BacktrackConfig
from disback_cli.method.dsm import denoising_step
from disback_cli.method.generator import OneStepGenerator
from disback_cli.method.losses import generator_step, make_generator_loss
from disback_cli.method.noise import TrainingSigma
from disback_cli.models.conditioning import condition_source
from disback_cli.models.networks import NetworkSpec, build_denoiser
from disback_cli.runtime.parallel import Execution

BF16_TOLERANCE = 0.05
"""Relative error allowed between bf16-autocast and fp32 outputs. bf16 keeps 8 significant bits
(round-off 2^-9, about 0.2 % per operation), which adds up to about 1 % through a U-Net; a wrong
cast or an overflow shows as tens of percent or NaN."""
FP32_TOLERANCE = 1e-3
"""Relative error allowed for compiled or channels-last outputs against eager fp32 ones. Other
kernels sum in another order (about 1e-6; TF32 is off during the checks); a wrong memory layout
or a miscompiled kernel shows as order 1."""
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


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """||other - reference|| / ||reference|| in float64 (NaN when either is not finite)."""
    reference, other = reference.detach().double(), other.detach().double()
    scale = reference.norm().item()
    difference = (other - reference).norm().item()
    return difference / scale if scale else (0.0 if difference == 0 else math.inf)


def flattened(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """All tensors as one flat CPU tensor, so lists of gradients compare by one relative error."""
    return torch.cat([t.detach().flatten().cpu() for t in tensors])


def agreement(name: str, error: float, tolerance: float, what: str, **numbers: float) -> Check:
    """A check named `name` that passes when `error` is within `tolerance` (NaN fails)."""
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


def forward_backward(
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
    out32, grads32 = forward_backward(model, inputs, Execution(device, "fp32"))
    out16, grads16 = forward_backward(model, inputs, Execution(device, "bf16"))
    grad_error = relative_error(flattened(grads32), flattened(grads16))
    if not all(bool(torch.isfinite(g).all()) for g in (*grads32, *grads16)):
        return Check(
            "bf16",
            "failed",
            "non-finite gradients in fp32 or bf16",
            {"gradient_relative_error": grad_error},
        )
    return agreement(
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
    return agreement(
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
    return agreement(
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
        betas=(0.0, 0.999),  # SiD's, as for EDM teachers
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
