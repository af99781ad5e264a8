"""Path nodes on disk and as backtracking targets: full weights, each loaded one switch ahead.

A `NodeFormat` is how a family stores the auxiliary model's checkpoints (full weights here;
adapters for text-to-image teachers, `text_to_image.lora`) and how `backtrack` hands them out as
targets. `record` trains what `trained` returns, saves with `save`, and states the disk it needs
from `node_bytes`; `backtrack` asks `targets` for the nodes in decreasing order.

Full-weight targets: while node i is the target, node i-1 is read, verified and moved to the
device on a worker thread (on CUDA through its own stream), so a target switch does not wait for
the disk. In memory at once: the current target and the next node. Node 0 is the teacher; it is
kept only if it is the first target, and otherwise read again at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from pydantic import ValidationError
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.denoiser_files import load_denoiser, save_denoiser
from disback_cli.models.networks import NetworkSpec
from disback_cli.runtime.sharding import WHOLE, Networks, local_part
from disback_cli.store.fileio import parse_json
from disback_cli.store.layout import check_no_links
from disback_cli.store.manifests import TrajectoryManifest
from disback_cli.store.tensorfile import read_safetensors_header

if TYPE_CHECKING:
    from disback_cli.models.family import Teacher

Prepare = Callable[[nn.Module], nn.Module]  # memory format and compilation of the run


class Targets(Protocol):
    def copy_of(self, index: int) -> nn.Module:
        """A trainable copy of node `index` (the fake score starts from one)."""
        ...

    def at(self, index: int) -> nn.Module:
        """Node `index` as the target."""
        ...

    def close(self) -> None: ...


class NodeFormat(Protocol):
    shardable: bool  # its targets can be sharded networks (`--parallel fsdp`)
    recording_copies: dict[str, int]  # weight-sized copies `record` trains, besides the teacher
    target_copies: dict[str, int]  # weight-sized copies of targets `backtrack` holds

    def trained(self, aux: nn.Module, cfg) -> nn.Module:
        """What of the auxiliary model trains (its parameters, or adapters added to it)."""
        ...

    def save(self, path: Path, aux: nn.Module, teacher: Teacher, info: dict, cfg) -> str:
        """Write node `path` atomically; return its sha256."""
        ...

    def node_bytes(self, aux_bytes: int, cfg) -> int: ...

    def describe(self, cfg) -> str: ...

    def targets(
        self,
        trajectory: Path,
        manifest: TrajectoryManifest,
        teacher: Teacher,
        device: torch.device,
        prepare: Prepare,
        verify: bool,
        networks: Networks = WHOLE,
    ) -> Targets: ...


class FullWeights:
    """Each node a denoiser file (optionally stored in bf16)."""

    shardable = True  # its targets can be sharded networks (`--parallel fsdp`)
    # Weight-sized copies held: while recording (besides the teacher), and as targets.
    recording_copies: ClassVar[dict[str, int]] = {
        "auxiliary model": 1,
        "auxiliary-model gradient": 1,
        "auxiliary-model Adam moments": 2,
    }
    target_copies: ClassVar[dict[str, int]] = {"target node": 1, "next node (prefetched)": 1}

    def trained(self, aux: nn.Module, cfg) -> nn.Module:
        return aux

    def save(self, path: Path, aux: nn.Module, teacher: Teacher, info: dict, cfg) -> str:
        dtype = torch.bfloat16 if cfg.node_dtype == "bf16" else None
        return save_denoiser(path, aux, teacher.spec, info, dtype)

    def node_bytes(self, aux_bytes: int, cfg) -> int:
        return aux_bytes // 2 if cfg.node_dtype == "bf16" else aux_bytes

    def describe(self, cfg) -> str:
        return f"{cfg.node_dtype} weights"

    def targets(
        self, trajectory, manifest, teacher, device, prepare, verify, networks=WHOLE
    ) -> PathNodes:
        return PathNodes(trajectory, manifest, teacher, device, prepare, verify, networks)


FULL_WEIGHTS = FullWeights()


def check_node_networks(trajectory: Path, manifest: TrajectoryManifest, teacher: Teacher) -> None:
    """Every node file's network and tensor shapes against the teacher's, from the file headers
    (nothing loaded): a node of another network stops the run before it writes anything, not at
    its target switch hours in."""
    expected = {name: tuple(t.shape) for name, t in teacher.denoiser.state_dict().items()}
    # (a sharded teacher's state dict holds the whole shapes)
    for node in manifest.nodes:
        if node.file is None:
            continue
        path = check_no_links(trajectory, node.file)
        metadata, shapes = read_safetensors_header(path)
        try:
            spec = NetworkSpec.model_validate(parse_json(metadata["network"]))
        except (KeyError, ValueError, ValidationError):
            raise DisbackError(f"{path}: bad network metadata") from None
        if spec != teacher.spec or shapes != expected:
            raise DisbackError(f"{path}: network differs from the teacher's")


def load_path_node(
    trajectory: Path,
    manifest: TrajectoryManifest,
    index: int,
    teacher: Teacher,
    device,
    verify: bool = True,
) -> nn.Module:
    """Path node `index` (>= 1) as a frozen denoiser, checked against the manifest."""
    node = manifest.nodes[index]
    path = check_no_links(trajectory, node.file)
    loaded = load_denoiser(path, device, node.sha256, verify)
    if loaded.spec != teacher.spec:
        raise DisbackError(f"{path}: network differs from the teacher's")
    return loaded.denoiser


class PathNodes:
    """Hands out targets in decreasing node order, prefetching the next one.

    Takes over the teacher's weights (`teacher.denoiser` becomes None) so that they can be freed
    once they are not the target. `networks` makes the nodes whole or sharded networks
    (`runtime.sharding`): sharded, each process reads only its rows of a node file. Targets are
    made by `networks.frozen` (sharded, they may be held in bf16), the copy to train by
    `networks` itself."""

    def __init__(
        self,
        trajectory: Path,
        manifest: TrajectoryManifest,
        teacher: Teacher,
        device: torch.device,
        prepare: Prepare = lambda node: node,
        verify: bool = True,
        networks: Networks = WHOLE,
    ) -> None:
        check_node_networks(trajectory, manifest, teacher)
        self.trajectory, self.manifest, self.teacher = trajectory, manifest, teacher
        self.device, self.prepare, self.verify = device, prepare, verify
        self.networks = networks
        self.held_teacher: nn.Module | None = teacher.denoiser  # see `target`
        teacher.denoiser = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disback-prefetch")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending: tuple[int, Future] | None = None
        self.current: tuple[int, nn.Module] | None = None

    def _load(self, index: int, networks: Networks) -> nn.Module:
        if index == 0:
            if self.held_teacher is not None:
                held = self.held_teacher
                return held if networks is self.networks else networks.copy(held)
            return networks.reread(lambda: self.teacher.family.reopen(self.teacher, self.device))
        node = self.manifest.nodes[index]
        return networks.load(
            check_no_links(self.trajectory, node.file),
            node.sha256 if self.verify else None,
            lambda: load_path_node(
                self.trajectory, self.manifest, index, self.teacher, self.device, self.verify
            ),
        )

    def _prepare(self, index: int) -> nn.Module:
        if self.stream is None:
            node = self._load(index, self.networks.frozen)
        else:
            with torch.cuda.stream(self.stream):
                node = self._load(index, self.networks.frozen)
        return self.prepare(node)

    def copy_of(self, index: int) -> nn.Module:
        """A copy of node `index` to train (the fake score starts from one): read from its
        file, or copied from the teacher."""
        if index == 0 and self.held_teacher is not None:
            return self.networks.copy(self.held_teacher)
        return self._load(index, self.networks)

    def at(self, index: int) -> nn.Module:
        """The target node `index`: the current one again, or (at a switch) the next one, after
        letting go of the old one so that at most two nodes are held."""
        if self.current is None or self.current[0] != index:
            self.current = None
            self.current = (index, self.target(index))
        return self.current[1]

    def target(self, index: int) -> nn.Module:
        """Node `index`, then start loading node `index - 1`."""
        if self.pending is not None and self.pending[0] == index:
            node = self.pending[1].result()
        else:
            node = self._prepare(index)
        if index > 0:
            self.held_teacher = None  # node 0 will be read again when its turn comes
        if self.stream is not None:  # the copy must finish before use, and the memory must not
            current = torch.cuda.current_stream(self.device)  # be reused while still read
            current.wait_stream(self.stream)
            for tensor in node.state_dict().values():
                local_part(tensor).record_stream(current)
        ahead = index > 1 or (index == 1 and self.networks.frozen.rereads_in_background)
        self.pending = (index - 1, self.worker.submit(self._prepare, index - 1)) if ahead else None
        return node

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
