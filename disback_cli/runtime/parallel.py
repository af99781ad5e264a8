"""How a run executes: device, precision and data parallelism across torchrun processes.

Data parallelism is designed so that K processes with per-rank batch B compute what one process
with batch K*B computes: every rank draws the random numbers of the *global* batch from the shared
stream and keeps its own slice, gradients are averaged across ranks before clipping, and logged
values are averaged too. Only dropout (the global torch stream) is seeded per rank. How the
networks are laid over the processes (whole copies, or FSDP2 shards) is the `sharding` layout's
to say; both compute the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from disback_cli.errors import ConfigError
from disback_cli.runtime.devices import check_fits_memory, resolve_device
from disback_cli.runtime.reporting import Reporter, SilentReporter
from disback_cli.runtime.sharding import PARALLEL, Replicated


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that prints results."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Execution:
    device: torch.device
    precision: str = "fp32"  # "bf16": networks under bfloat16 autocast, fp32 weights and losses
    rank: int = 0
    world_size: int = 1
    channels_last: bool | None = None  # None: on for images on CUDA
    compile: bool = False  # torch.compile the networks (in place: state-dict names unchanged)
    layout: Replicated = field(default=None)  # type: ignore[assignment]  # None: whole copies

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(
                self, "layout", Replicated(self.device, self.rank, self.world_size, None)
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")

    def global_batch(self, per_rank: int) -> int:
        return per_rank * self.world_size

    def local(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's slice of a tensor drawn for the global batch."""
        if x is None or not self.distributed:
            return x
        n = x.shape[0] // self.world_size
        return x[self.rank * n : (self.rank + 1) * n]

    def _channels_last(self, ndim: int) -> bool:
        on = self.device.type == "cuda" if self.channels_last is None else self.channels_last
        return on and ndim == 4

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in channels-last layout when that is on (it helps convolutions on CUDA)."""
        if self._channels_last(x.ndim):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, denoiser: torch.nn.Module) -> torch.nn.Module:
        """Memory format and compilation of a denoiser this run evaluates (sharded weights keep
        their layout: FSDP's flat shards have no channels to reorder)."""
        if self._channels_last(1 + len(denoiser.data_shape)) and not self.layout.sharded:
            denoiser.to(memory_format=torch.channels_last)
        if self.compile:
            denoiser.compile(backend=os.environ.get("DISBACK_COMPILE_BACKEND", "inductor"))
        return denoiser

    def rank_seed(self, seed: int) -> int:
        """Seed of this rank's global torch stream (dropout); rank 0 keeps the run seed."""
        if self.rank == 0:
            return seed
        return int(hashlib.sha256(f"{seed}:{self.rank}".encode()).hexdigest()[:15], 16)

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.layout.average_gradients(parameters)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Average of a tensor over ranks (the value a single process would have computed)."""
        if not self.distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (stop requests must be agreed on)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """One picklable object from every rank, in rank order (used for small state only)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's object on rank 0 (in rank order); None elsewhere."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def execution(cfg) -> Execution:
    """The execution of this process for a config with device and compute fields; joins the
    torchrun process group when launched by it (NCCL on CUDA, gloo on CPU, one GPU per local
    rank)."""
    device = cfg.device
    rank, world_size = 0, 1
    if launched_by_torchrun():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = resolve_device(device)
        if resolved.type == "cuda":
            resolved = torch.device("cuda", local_rank)
            torch.cuda.set_device(resolved)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        resolved = resolve_device(device)
    if resolved.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.set_num_threads(cpu_threads(cfg.threads))
    layout = PARALLEL[getattr(cfg, "parallel", Replicated.name)]
    if layout is not Replicated and world_size == 1:
        raise ConfigError(
            f"--parallel {layout.name} shards the networks over processes: launch with torchrun "
            "--nproc_per_node=N (N >= 2), or use --parallel ddp on one process"
        )
    placed = layout(resolved, rank, world_size, getattr(cfg, "shard_size", None))
    return Execution(
        resolved, cfg.precision, rank, world_size, cfg.channels_last, cfg.compile, placed
    )


def cpu_threads(requested: int | None = None) -> int:
    """Intra-op threads for this process: `requested`, else OMP_NUM_THREADS when the user set it,
    else the cores this process may run on (its affinity, not the machine's count) shared among
    the processes torchrun started on this host, so that they do not oversubscribe the cores."""
    if requested:
        return requested
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(processes, 1))


def process_of(cfg, reporter: Reporter | None = None) -> tuple[Execution, Reporter]:
    """This process's execution (see `execution`) and what it reports through: rank 0 reports,
    the other ranks of a torchrun launch stay silent."""
    ex = execution(cfg)
    return ex, (reporter or SilentReporter()) if ex.is_main else SilentReporter()


def shutdown() -> None:
    """End the process group once every rank is done with it: a rank that tore down its gloo
    threads while another still finished its work sometimes aborted at exit ("terminate called
    without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_batch_fits(batch: int, data_shape: tuple[int, ...], ex: Execution) -> None:
    """Refuse a per-process batch whose training tensors alone cannot fit: every rank draws the
    global batch's noise, and an iteration holds about 16 batch-sized float32 tensors."""
    size = 16 * ex.global_batch(batch) * math.prod(data_shape) * 4
    check_fits_memory(f"--batch {batch}", size, ex.device)
