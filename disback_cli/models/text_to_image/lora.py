"""Path nodes as low-rank adapters (LoRA, Hu et al. 2021) of the teacher's UNet.

A full SDXL node is ~5 GB in bf16; as a rank-r adapter of the attention projections it is a few
MB. `record --lora-rank R` trains only the adapters of the auxiliary model (peft's layers on
to_q, to_k, to_v and to_out.0, alpha = r, B initialised to zero so node 0 is exactly the
teacher) and saves them; `backtrack` swaps each node's adapters into one adapted teacher copy, so
targets cost one UNet in memory, and merges node N into plain weights to start the fake score:
W' = W + (alpha / r) B A.

Files: `disback.lora` safetensors holding `<layer>.lora_A.weight` and `<layer>.lora_B.weight`
for every adapted layer of the denoiser, with the rank, alpha and target names in the metadata.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.models.path_nodes import Prepare
from disback_cli.store.fileio import atomic_write_chunks, parse_json
from disback_cli.store.layout import check_no_links
from disback_cli.store.manifests import TrajectoryManifest
from disback_cli.store.tensorfile import read_safetensors, safetensors_chunks

FORMAT = "disback.lora"
FORMAT_VERSION = 1
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (diffusers' LoRA default)
ADAPTER = "default"

# DMD2's LoRA SDXL run trains rank-64 adapters with alpha 8 at 100x its full-weight rate (5e-5
# against 5e-7). From B = 0, an Adam step moves W by (alpha / r) dB A, with |dB| ~ lr and A's
# entries ~ 1 / sqrt(fan_in): about (alpha / r) lr sqrt(r) / sqrt(fan_in). Ours (alpha = r)
# move W as far as DMD2's at lr = full rate x 100 / sqrt(r).
DMD2_ADAPTER_FACTOR = 100.0
SLOW_ADAPTERS = 0.1  # below this share of the rank's default rate, warn before recording


def adapter_rate(full_rate: float, rank: int) -> float:
    """The learning rate of rank-`rank` adapters that moves the weights about as far per step as
    DMD2's LoRA run does, relative to the full-weight rate `full_rate`."""
    return full_rate * DMD2_ADAPTER_FACTOR / math.sqrt(rank)


def slow_adapter_warning(lr: float, rank: int, full_rate: float) -> str | None:
    """One line when adapters at `lr` would barely move the path: the nodes then stay at the
    teacher, and backtracking along them is backtracking along the teacher."""
    default = adapter_rate(full_rate, rank)
    if lr >= SLOW_ADAPTERS * default:
        return None
    return (
        f"rank-{rank} adapters at --lr {lr:g} move the path far less than full weights at "
        f"{full_rate:g} (the default for rank {rank} is {default:.3g}); the path may barely "
        "leave the teacher"
    )


def _peft():
    try:
        import peft
    except ImportError:
        raise DisbackError('--lora-rank needs peft: pip install -e ".[diffusers]"') from None
    return peft


def add_lora(denoiser: nn.Module, rank: int, seed: int) -> None:
    """Adapters of `rank` on the UNet's attention projections, in place; only they train. A is
    drawn from `seed` (the global random stream is left as it was), B is zero."""
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights=True
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, denoiser)
    if not _layers(denoiser):
        raise DisbackError("--lora-rank: the network has no attention projections to adapt")


def _layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers by name (those with a base layer and LoRA factors)."""
    return {
        name: m
        for name, m in denoiser.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "lora_A")
    }


def lora_parameters(denoiser: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' factors under file names: `<layer>.lora_A.weight`, `<layer>.lora_B.weight`."""
    found = {}
    for name, layer in _layers(denoiser).items():
        found[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
        found[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
    return found


class LoraFactors(nn.Module):
    """The adapters' factors as a module of their own (the same parameters, not copies): what a
    resume point saves and restores of an adapted model, and what its optimiser steps."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.names = list(lora_parameters(denoiser))
        self.factors = nn.ParameterList(lora_parameters(denoiser).values())


def check_lora(denoiser: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse factors that are not exactly the adapted `denoiser`'s, by name and shape."""
    params = lora_parameters(denoiser)
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:2]
        raise DisbackError(f"{source}: adapters do not match the network (e.g. {missing})")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            raise DisbackError(f"{source}: {name} has shape {tuple(tensors[name].shape)}")


def set_lora(denoiser: nn.Module, tensors: dict[str, torch.Tensor] | None, source: str) -> None:
    """Load a node's factors into the adapted `denoiser` (None: zeros, i.e. the teacher)."""
    if tensors is not None:
        check_lora(denoiser, tensors, source)
    with torch.no_grad():
        for name, param in lora_parameters(denoiser).items():
            if tensors is None:
                param.zero_()
            else:
                param.copy_(tensors[name])


def merged(denoiser: nn.Module) -> nn.Module:
    """A plain copy of an adapted denoiser with its current adapters merged into the weights."""
    plain = copy.deepcopy(denoiser)
    # peft's record of the adapters goes too: adapters added to the copy (backtrack --lora-rank
    # on the fake score) would otherwise be added beside it, with peft's warning of two.
    vars(plain).pop("peft_config", None)
    for name, layer in _layers(plain).items():
        base = layer.base_layer
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        with torch.no_grad():
            base.weight += layer.scaling[ADAPTER] * (b @ a).reshape(base.weight.shape)
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name), child, base)
    return plain.requires_grad_(False)


class MergedWeights(Mapping):
    """The plain state dict of an adapted denoiser (its network's own tensor names), each adapted
    weight merged (W + (alpha / r) B A) only when it is read: a file writer that reads one
    tensor at a time never holds more than one merged tensor, not a merged copy of the network."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.layers = {f"{name}.weight": layer for name, layer in _layers(denoiser).items()}
        self.tensors = {
            key.replace(".base_layer.", "."): value
            for key, value in denoiser.state_dict().items()
            if ".lora_" not in key
        }

    def __getitem__(self, key: str) -> torch.Tensor:
        weight, layer = self.tensors[key].detach(), self.layers.get(key)
        if layer is None:
            return weight
        a, b = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
        return weight + layer.scaling[ADAPTER] * (b @ a).reshape(weight.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def save_lora(path: Path, denoiser: nn.Module, rank: int, network_json: str, info: dict) -> str:
    """Write the adapters of `denoiser` atomically; return the file's sha256."""
    tensors = {k: v.detach() for k, v in lora_parameters(denoiser).items()}
    lora = {"rank": rank, "alpha": rank, "targets": list(TARGETS)}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "network": network_json,
        "info": json.dumps({**info, "lora": lora}, sort_keys=True),
    }
    return atomic_write_chunks(path, *safetensors_chunks(tensors, meta))


def read_lora(
    path: Path, expected_sha256: str | None = None, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """A node's adapters and info, checked: the format, the rank the config asked for, finite
    values (which factors exist is checked against the network by `check_lora`)."""
    tensors, metadata, _ = read_safetensors(path, expected_sha256, verify)
    if metadata.get("format") != FORMAT:
        raise DisbackError(f"{path}: not a disback LoRA node (metadata 'format' missing)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise DisbackError(
            f"{path}: unknown LoRA format version {metadata.get('format_version')!r:.20}"
        )
    try:
        info = parse_json(metadata.get("info", "{}"))
        rank = info["lora"]["rank"]
    except (ValueError, KeyError, TypeError):
        raise DisbackError(f"{path}: bad LoRA metadata") from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise DisbackError(f"{path}: tensor {name} is not finite floating point")
    return {k: v.float() for k, v in tensors.items()}, {**info, "rank": rank}


class Adapters:
    """Path nodes stored as the auxiliary model's rank-r adapters (`record --lora-rank`)."""

    shardable = False  # its targets are one whole adapted copy of the teacher
    recording_copies: ClassVar[dict[str, int]] = {"auxiliary model (frozen; adapters train)": 1}
    target_copies: ClassVar[dict[str, int]] = {"adapted teacher (every target)": 1}

    def trained(self, aux: nn.Module, cfg) -> nn.Module:
        add_lora(aux, cfg.lora_rank, cfg.seed)
        return LoraFactors(aux)

    def save(self, path: Path, aux: nn.Module, teacher, info: dict, cfg) -> str:
        return save_lora(path, aux, cfg.lora_rank, teacher.spec.model_dump_json(), info)

    def node_bytes(self, aux_bytes: int, cfg) -> int:
        return aux_bytes  # (the trained adapters: a resume point's own measure)

    def describe(self, cfg) -> str:
        return f"LoRA rank {cfg.lora_rank}"

    def targets(
        self, trajectory, manifest, teacher, device, prepare, verify, networks=None
    ) -> LoraPathNodes:
        return LoraPathNodes(trajectory, manifest, teacher, prepare, verify)


class LoraPathNodes:
    """Targets of a path recorded as low-rank adapters: one adapted copy of the teacher, whose
    adapters are replaced by the next node's at each switch (node 0: zero adapters, exactly the
    teacher). Targets then hold one UNet's memory, and reading a node is reading a few
    megabytes, so nothing is prefetched, and every node is read and matched against the network
    when the targets are opened."""

    def __init__(
        self,
        trajectory: Path,
        manifest: TrajectoryManifest,
        teacher,
        prepare: Prepare = lambda node: node,
        verify: bool = True,
    ) -> None:
        self.trajectory, self.manifest, self.verify = trajectory, manifest, verify
        self.target = teacher.denoiser  # takes over the teacher's weights
        teacher.denoiser = None
        add_lora(self.target, manifest.config.lora_rank, seed=0)  # factors are set before use
        self.target.eval().requires_grad_(False)
        prepare(self.target)
        self.current: int | None = None
        for index in range(1, len(manifest.nodes)):  # now, not at its switch hours later
            check_lora(self.target, *self._read(index))

    def _read(self, index: int) -> tuple[dict[str, torch.Tensor], str]:
        """Node `index`'s factors (index >= 1), checked against the manifest, and their file."""
        node = self.manifest.nodes[index]
        path = check_no_links(self.trajectory, node.file)
        tensors, info = read_lora(path, node.sha256, self.verify)
        if info["rank"] != self.manifest.config.lora_rank:
            raise DisbackError(
                f"{path}: LoRA rank {info['rank']}, the trajectory records "
                f"{self.manifest.config.lora_rank}"
            )
        return tensors, str(path)

    def _set(self, index: int) -> None:
        if index == self.current:
            return
        tensors, source = self._read(index) if index > 0 else (None, "the teacher")
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


class LowRankAdapters:
    """`backtrack --lora-rank R` (DMD2's `--generator_lora`): the generator and the fake score
    stay frozen and rank-R adapters on their attention projections train (alpha = R, B = 0, so
    iteration 0 is G0 and node N exactly). Only the adapters have gradients, Adam moments and an
    EMA, and only they go into resume points; the generator's EMA shares its frozen weights. An
    SDXL backtrack then holds four UNets (generator, fake score, target, next node) instead of
    eleven. The generator files `sample` reads hold plain weights, the adapters merged in."""

    generator_copies: ClassVar[dict[str, float]] = {"generator (frozen; adapters train)": 1}
    fake_copies: ClassVar[dict[str, float]] = {"fake score (frozen; adapters train)": 1}

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def trained(self, network: nn.Module, seed: int) -> nn.Module:
        """Adapters added to `network` (A drawn from `seed`): their factors train, nothing else."""
        add_lora(network, self.rank, seed)
        return LoraFactors(network)

    def ema_of(self, generator: nn.Module, copy_denoiser) -> nn.Module:
        """A copy of the adapted generator that shares its frozen weights (the average of a
        constant is the constant): only the adapters are copied."""
        frozen = {id(p): p for name, p in generator.named_parameters() if "lora_" not in name}
        return copy.deepcopy(generator, frozen)

    def kept(self, ema: nn.Module) -> nn.Module:
        return LoraFactors(ema)

    def plain(self, denoiser: nn.Module) -> Mapping[str, torch.Tensor]:
        """Its plain weights, each adapted one merged as the file writer reads it."""
        return MergedWeights(denoiser)
