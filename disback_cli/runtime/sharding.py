"""How a run's networks are laid over its processes, chosen once by `--parallel` (`PARALLEL`).

* `ddp`: every process holds whole copies and averages gradients after the backward pass (data
  parallelism; one process is the plain single-device case).
* `fsdp`: every network is sharded over all processes with PyTorch FSDP2 (`fully_shard` on each
  block the architecture names, then on the whole network): parameters, gradients, Adam moments,
  the EMA, the fake score, the teacher and the path nodes each take 1/world of a copy per process;
  gradients are reduce-scattered and averaged by FSDP itself.
* `hsdp`: FSDP2 on a 2-D mesh, sharded within a group of `--shard-size` processes (a node's
  GPUs) and replicated across groups (fewer bytes over the slow links between nodes).

Everything that depends on the layout goes through one object: copies of the teacher's network
(`networks`), averaging gradients, gathering a network's full weights for the files `sample`
reads, and (through `sharded`) how a resume point is stored (`stages.lifecycle`). The sharded
layouts never build a whole copy of a network beyond the teacher they start from: copies are
made on the meta device, sharded, and filled with this process's rows (from another sharded
network, or read from a safetensors file by slices).
"""

from __future__ import annotations

import copy
import math
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.store.fileio import check_sha256, hash_regular_file
from disback_cli.store.tensorfile import MAX_SAFETENSORS_BYTES, check_tensor_table, whole_tensor

BUCKET_ELEMENTS = 32 << 20  # gradients are averaged in chunks of at most this many values
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --frozen-dtype

Units = Callable[[nn.Module], list[nn.Module]]  # the blocks FSDP shards one by one
T = TypeVar("T")
Saved = nn.Module | Mapping[str, torch.Tensor]  # what a file writer gets of a network


class Networks(Protocol):
    """How a run makes its networks: whole (`WholeCopies`) or sharded (`ShardedCopies`)."""

    frozen: Networks  # how it makes the networks that never train (teacher, path nodes)

    def adopt(self, module: nn.Module) -> nn.Module: ...

    def copy(self, module: nn.Module) -> nn.Module: ...

    def load(
        self, path: Path, sha256: str | None, read_whole: Callable[[], nn.Module]
    ) -> nn.Module: ...

    def reread(self, read: Callable[[], nn.Module]) -> nn.Module: ...

    rereads_in_background: bool  # whether `reread` may run in a prefetching thread


def blocks_of(network: nn.Module) -> list[nn.Module]:
    """The blocks each architecture names (`shard_blocks()`), in module order: the units FSDP
    gathers one at a time, so that a forward pass holds one block's full weights at once."""
    found: list[nn.Module] = []
    for module in network.modules():
        declared = getattr(module, "shard_blocks", None)
        if callable(declared):
            found.extend(declared())
    return found


class Replicated:
    """Whole copies in every process; gradients all-reduced in buckets after the backward pass
    (not DistributedDataParallel: the fake score is evaluated both inside the generator's loss,
    frozen, and in its own step, which DDP's hooks do not model)."""

    name = "ddp"
    shards = 1  # ways each network is split
    sharded = False  # resume points as one file (True: a folder of shards)

    def __init__(
        self, device: torch.device, rank: int, world_size: int, shard_size: int | None
    ) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        for bucket in _buckets(grads):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= self.world_size
            for grad, synced in zip(
                bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True
            ):
                grad.copy_(synced)

    def networks(
        self, template: nn.Module, units: Units, device: torch.device, frozen_dtype=torch.float32
    ) -> WholeCopies:
        return WHOLE

    def write_whole(self, module: nn.Module, write: Callable[[Saved], str]) -> str | None:
        """Rank 0 writes the network's whole weights with `write` and gets its result (here:
        `write` gets the module itself); every process calls this, the others get None."""
        return write(module) if self.rank == 0 else None

    def local_norm(self, norm: torch.Tensor) -> torch.Tensor:
        return norm

    def hold_small(self, module: nn.Module) -> nn.Module:
        """A small trained network of the run's own (a discriminator head) held as this layout
        holds networks (here: whole)."""
        return module

    def settle(self, module: nn.Module) -> None:
        """Leave the module's parameters as this layout keeps them between steps."""

    def place_teacher(
        self, read: Callable[[], T], device: torch.device, frozen_dtype=torch.float32
    ) -> tuple[T, Networks]:
        """The teacher `read` opens, its network held as this layout holds networks, and how
        the run makes its other networks from it. Sharded, the processes of a host read in
        turns, each sharding the teacher before the next one reads it: a host holds one whole
        copy of the teacher at a time, not one per process."""

        def read_and_place() -> tuple[T, Networks]:
            teacher = read()
            networks = self.networks(
                teacher.denoiser, teacher.family.shard_units, device, frozen_dtype
            )
            teacher.denoiser = networks.adopt(teacher.denoiser)
            return teacher, networks

        return self.in_turns(read_and_place)

    def in_turns(self, work: Callable[[], T]) -> T:
        """`work` in every process (here: all at once)."""
        return work()


class FullyShard(Replicated):
    """FSDP2 over all processes (a 1-D mesh)."""

    name = "fsdp"
    sharded = True

    def __init__(
        self, device: torch.device, rank: int, world_size: int, shard_size: int | None
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__(device, rank, world_size, shard_size)
        self.shards = world_size
        self.mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Nothing to do: FSDP reduce-scattered the mean gradient during the backward pass."""

    def networks(
        self, template: nn.Module, units: Units, device: torch.device, frozen_dtype=torch.float32
    ) -> ShardedCopies:
        return ShardedCopies(template, units, self.mesh, device, frozen_dtype, self.in_turns)

    def write_whole(self, module: nn.Module, write: Callable[[Saved], str]) -> str | None:
        """Rank 0's `write` gets the sharded state dict and reads it as `safetensors_chunks`
        does (each tensor once, in name order), gathering each tensor whole as it writes it;
        the other processes take part in the same gathers. No process ever holds more than one
        whole tensor beyond its shards."""
        self.settle(module)
        state = module.state_dict()
        if self.rank == 0:
            return write(state)
        for name in sorted(state):
            whole_tensor(state[name])
        return None

    def local_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """A gradient norm over sharded gradients, as one plain number on every process."""
        return whole_tensor(norm)

    def hold_small(self, module: nn.Module) -> nn.Module:
        """Sharded as one unit: its gradients are then reduced, and its norms taken, as the
        other networks' are."""
        from torch.distributed.fsdp import fully_shard

        return fully_shard(module, mesh=self.mesh)

    def settle(self, module: nn.Module) -> None:
        """Shard again what a forward pass without gradients left gathered: FSDP keeps the
        root unit's parameters whole after the forward pass (for the backward it expects)."""
        for unit in module.modules():
            reshard = getattr(unit, "reshard", None)
            if callable(reshard):
                reshard()

    def in_turns(self, work: Callable[[], T]) -> T:
        """`work` in one process of each host at a time (by local rank, hosts in parallel)."""
        turns = torch.tensor(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), device=self.device)
        dist.all_reduce(turns, dist.ReduceOp.MAX)  # the same count of barriers everywhere
        mine = int(os.environ.get("LOCAL_RANK", "0"))
        result: T | None = None
        for turn in range(int(turns)):
            if turn == mine:
                result = work()
            dist.barrier()
        return result


class HybridShard(FullyShard):
    """FSDP2 sharded within groups of `shard_size` processes, replicated across groups."""

    name = "hsdp"

    def __init__(
        self, device: torch.device, rank: int, world_size: int, shard_size: int | None
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        Replicated.__init__(self, device, rank, world_size, shard_size)
        shard_size = shard_size or world_size
        if shard_size < 1 or world_size % shard_size:
            raise DisbackError(
                f"--shard-size {shard_size} does not divide the {world_size} processes"
            )
        self.shards = shard_size
        self.mesh = init_device_mesh(
            device.type,
            (world_size // shard_size, shard_size),
            mesh_dim_names=("replicate", "shard"),
        )


PARALLEL: dict[str, type[Replicated]] = {
    layout.name: layout for layout in (Replicated, FullyShard, HybridShard)
}


def refuse_unsupported(cfg, unsupported: list[tuple[bool, str]]) -> None:
    """One line naming the first of `unsupported` (condition, what) that holds, for a run whose
    networks are sharded (`--parallel fsdp|hsdp`), before anything is written."""
    refused = [what for bad, what in unsupported if bad]
    if cfg.sharded and refused:
        raise ConfigError(
            f"--parallel {cfg.parallel} does not support {refused[0]} yet; use --parallel ddp"
        )


def _buckets(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        if bucket and size + grad.numel() > BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        yield bucket


class WholeCopies:
    """Copies of networks as whole modules."""

    @property
    def frozen(self) -> WholeCopies:
        return self

    def adopt(self, module: nn.Module) -> nn.Module:
        """The network as this layout holds it (here: as it is)."""
        return module

    def copy(self, module: nn.Module) -> nn.Module:
        return copy.deepcopy(module)

    def load(
        self, path: Path, sha256: str | None, read_whole: Callable[[], nn.Module]
    ) -> nn.Module:
        """The network of the denoiser file `path` (here: read whole, by `read_whole`)."""
        return read_whole()

    rereads_in_background = True

    def reread(self, read: Callable[[], nn.Module]) -> nn.Module:
        """The teacher's network read again when it becomes the target (here: as it is)."""
        return read()


WHOLE = WholeCopies()


class ShardedCopies:
    """Sharded networks: copies are built on the meta device from a template of their source's
    network (recorded when it was sharded), sharded per block, materialised as this process's
    shards only and filled with its rows."""

    def __init__(
        self,
        template: nn.Module,
        units: Units,
        mesh,
        device: torch.device,
        frozen_dtype: torch.dtype,
        in_turns: Callable[[Callable[[], nn.Module]], nn.Module],
    ) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.units, self.mesh, self.device, self.in_turns = units, mesh, device, in_turns
        self.templates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.teacher = _meta_template(template)  # what path nodes are
        self.dtype, self.policy = torch.float32, MixedPrecisionPolicy()
        self.frozen = self
        if frozen_dtype != torch.float32:  # stored narrow, gathered as float32 to compute
            self.frozen = copy.copy(self)
            self.frozen.dtype = frozen_dtype
            self.frozen.policy = MixedPrecisionPolicy(param_dtype=torch.float32)
            self.frozen.frozen = self.frozen

    def adopt(self, module: nn.Module) -> nn.Module:
        """Shard a whole network in place (its full weights are freed)."""
        template = _meta_template(module)
        self._shard(module)
        self.templates[module] = template
        return module

    def _shard(self, module: nn.Module) -> nn.Module:
        """Parameters in this copy's dtype, sharded per unit, then the whole network."""
        from torch.distributed.fsdp import fully_shard

        for parameter in module.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(self.dtype)
        for unit in self.units(module):
            fully_shard(unit, mesh=self.mesh, mp_policy=self.policy)
        fully_shard(module, mesh=self.mesh, mp_policy=self.policy)
        return module

    def _empty(self, template: tuple[nn.Module, dict]) -> nn.Module:
        network, buffers = template
        module = self._shard(copy.deepcopy(network))
        module.to_empty(device=self.device)
        with torch.no_grad():  # buffers are not sharded; to_empty left them uninitialised
            for name, value in buffers.items():
                module.get_buffer(name).copy_(value)
        self.templates[module] = template
        return module

    def copy(self, source: nn.Module) -> nn.Module:
        """A sharded copy of the sharded `source` (same layout: each process copies its rows)."""
        module = self._empty(self.templates[source])
        with torch.no_grad():
            theirs = source.state_dict()
            for name, mine in module.state_dict().items():
                local_part(mine).copy_(local_part(theirs[name]))
        return module

    def load(
        self, path: Path, sha256: str | None, read_whole: Callable[[], nn.Module]
    ) -> nn.Module:
        """A sharded network with this process's rows of each tensor read from the safetensors
        file `path` (checked against `sha256` first, when given; the caller has checked its
        network description)."""
        from safetensors import safe_open

        if sha256 is not None:
            check_sha256(path, hash_regular_file(path, MAX_SAFETENSORS_BYTES, "node"), sha256)
        module = self._empty(self.teacher)
        expected = module.state_dict()
        with safe_open(str(path), framework="pt") as f:
            table = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            check_tensor_table(path, expected, table)
            with torch.no_grad():
                for name, value in expected.items():
                    rows = f.get_slice(name)[local_rows(value)]
                    if rows.is_floating_point() and not bool(torch.isfinite(rows).all()):
                        raise DisbackError(f"{path}: tensor {name} holds NaN or infinite values")
                    local_part(value).copy_(rows)
        return module

    rereads_in_background = False  # the processes of a host take turns (collectives)

    def reread(self, read: Callable[[], nn.Module]) -> nn.Module:
        """The teacher's network read again when it becomes the target, sharded as it is read,
        one process of a host at a time (as `place_teacher`): never a whole copy per process."""
        return self.in_turns(lambda: self.adopt(read()))


def _meta_template(network: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The network with its parameters on the meta device (no memory), and its buffers."""
    meta = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
        for p in network.parameters()
    }
    buffers = {k: v.detach().clone() for k, v in network.named_buffers()}
    return copy.deepcopy(network, meta), buffers


def local_part(value: torch.Tensor) -> torch.Tensor:
    """This process's part of a (sharded) tensor: its local shard, or the tensor itself."""
    to_local = getattr(value, "to_local", None)
    return to_local() if callable(to_local) else value


def local_rows(value: torch.Tensor) -> tuple[slice, ...] | slice:
    """This process's part of a (sharded) tensor as a slice of the whole: FSDP2 splits dim 0 the
    way `torch.chunk` does (chunks of ceil(n/shards) rows, the last ones shorter or empty)."""
    placements = getattr(value, "placements", None)
    if placements is None:
        return slice(None)
    start, stop = 0, value.shape[0]
    for mesh_dim, placement in enumerate(placements):
        if placement.is_shard():
            if placement.dim != 0:
                raise DisbackError(f"sharding along dimension {placement.dim} is not supported")
            shards = value.device_mesh.size(mesh_dim)
            index = value.device_mesh.get_local_rank(mesh_dim)
            chunk = math.ceil((stop - start) / shards)
            start, stop = min(start + index * chunk, stop), min(start + (index + 1) * chunk, stop)
    return slice(start, stop)
