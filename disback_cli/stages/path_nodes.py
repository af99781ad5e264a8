"""Path nodes as backtracking targets, each loaded in the background one switch ahead.

While node i is the target, node i-1 is read, verified and moved to the device on a worker thread
(on CUDA through its own stream), so a target switch does not wait for the disk. In memory at once:
the current target and the next node (plus the trained networks, which are not held here). Node 0
is the teacher; it is kept only if it is the first target, and otherwise read again at the end.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.denoiser_files import load_denoiser
from disback_cli.models.teachers import Teacher, open_teacher
from disback_cli.models.text_to_image.lora import add_lora, merged, read_lora, set_lora
from disback_cli.runtime.parallel import Execution
from disback_cli.store.layout import check_no_links
from disback_cli.store.manifests import TrajectoryManifest


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
    once they are not the target."""

    def __init__(
        self,
        trajectory: Path,
        manifest: TrajectoryManifest,
        teacher: Teacher,
        ex: Execution,
        verify: bool = True,
    ) -> None:
        self.trajectory, self.manifest, self.teacher = trajectory, manifest, teacher
        self.ex, self.verify = ex, verify
        self.held_teacher: nn.Module | None = teacher.denoiser  # released after the first target
        teacher.denoiser = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disback-prefetch")
        self.stream = torch.cuda.Stream(ex.device) if ex.device.type == "cuda" else None
        self.pending: tuple[int, Future] | None = None
        self.current: tuple[int, nn.Module] | None = None

    def _load(self, index: int) -> nn.Module:
        if index == 0:
            if self.held_teacher is not None:
                return self.held_teacher
            source, sha256 = self.teacher.source, self.teacher.sha256
            return open_teacher(source, self.ex.device, sha256, recorded_in="this run").denoiser
        return load_path_node(
            self.trajectory, self.manifest, index, self.teacher, self.ex.device, self.verify
        )

    def _prepare(self, index: int) -> nn.Module:
        if self.stream is None:
            node = self._load(index)
        else:
            with torch.cuda.stream(self.stream):
                node = self._load(index)
        return self.ex.prepare(node)

    def copy_of(self, index: int) -> nn.Module:
        """A copy of node `index` to train (the fake score starts from one)."""
        return copy.deepcopy(self._load(index))

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
            current = torch.cuda.current_stream(self.ex.device)  # be reused while still read
            current.wait_stream(self.stream)
            for tensor in node.state_dict().values():
                tensor.record_stream(current)
        self.pending = (index - 1, self.worker.submit(self._prepare, index - 1)) if index else None
        return node

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


class LoraPathNodes:
    """Targets of a path recorded as low-rank adapters (`record --lora-rank`): one adapted copy
    of the teacher, whose adapters are replaced by the next node's at each switch (node 0: zero
    adapters, exactly the teacher). Targets then hold one UNet's memory, and reading a node is
    reading a few megabytes, so nothing is prefetched."""

    def __init__(
        self,
        trajectory: Path,
        manifest: TrajectoryManifest,
        teacher: Teacher,
        ex: Execution,
        verify: bool = True,
    ) -> None:
        self.trajectory, self.manifest, self.verify = trajectory, manifest, verify
        self.target = teacher.denoiser  # takes over the teacher's weights
        teacher.denoiser = None
        add_lora(self.target, manifest.config.lora_rank, seed=0)  # factors are set before use
        self.target.eval().requires_grad_(False)
        ex.prepare(self.target)
        self.current: int | None = None

    def _set(self, index: int) -> None:
        if index == self.current:
            return
        tensors, source = None, "the teacher"
        if index > 0:
            node = self.manifest.nodes[index]
            path = check_no_links(self.trajectory, node.file)
            tensors, info = read_lora(path, node.sha256, self.verify)
            if info["rank"] != self.manifest.config.lora_rank:
                raise DisbackError(
                    f"{path}: LoRA rank {info['rank']}, the trajectory records "
                    f"{self.manifest.config.lora_rank}"
                )
            source = str(path)
        set_lora(self.target, tensors, source)
        self.current = index

    def copy_of(self, index: int) -> nn.Module:
        """Node `index` merged into plain weights, to train (the fake score starts from one)."""
        self._set(index)
        return merged(self.target)

    def at(self, index: int) -> nn.Module:
        self._set(index)
        return self.target

    def close(self) -> None:
        pass


class NoTargets:
    """No target at all (diffratio learns from data, not from the teacher's score)."""

    def at(self, index: int) -> None:
        return None

    def close(self) -> None:
        pass


def path_nodes(
    trajectory: Path, manifest: TrajectoryManifest, teacher: Teacher, ex: Execution, verify: bool
) -> PathNodes | LoraPathNodes:
    """The targets of a trajectory, as its nodes were recorded (full weights or adapters)."""
    kind = LoraPathNodes if manifest.config.lora_rank else PathNodes
    return kind(trajectory, manifest, teacher, ex, verify)
