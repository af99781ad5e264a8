"""Resumable training state (weights, optimisers, random stream, step) as one safetensors file.

One file per save, written atomically, so a crash leaves either the previous state or the new one.
Optimiser tensors go into the tensor table, their scalars and hyper-parameters into the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disback_cli.checkpoint import encode_safetensors, load_weights, read_safetensors, tensors_of
from disback_cli.errors import DisbackError
from disback_cli.fileio import atomic_write_bytes

FORMAT = "disback.state"


def _pack_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict) -> dict:
    state_dict = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unpack_optimizer(name: str, opt: torch.optim.Optimizer, packed: dict, tensors: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for index, fields in packed["scalars"].items():
        state.setdefault(int(index), {}).update(fields)
    opt.load_state_dict({"state": state, "param_groups": packed["param_groups"]})


def local_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's global torch streams (dropout draws from them)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_key(kind: str, rank: int) -> str:
    base = "rng.global" if kind == "cpu" else "rng.global_cuda"
    return base if rank == 0 else f"{base}.rank{rank}"


def save_state(
    path: str | Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    rng: torch.Generator,
    extra: dict | None = None,
    rank_rng: list[dict[str, torch.Tensor]] | None = None,
) -> str:
    """Write the full training state at `step` atomically; return the file's sha256.

    `extra` is loop state that is neither weights nor optimiser (e.g. the switching rule's);
    `rank_rng` holds the global streams of every rank of a data-parallel run (default: this
    process's)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        tensors.update(tensors_of(module, prefix=f"module.{name}."))
    optim = {name: _pack_optimizer(name, opt, tensors) for name, opt in optimizers.items()}
    tensors["rng"] = rng.get_state().cpu()
    for rank, state in enumerate(rank_rng or [local_rng_state(rng.device)]):
        for kind, value in state.items():
            tensors[_rng_key(kind, rank)] = value.cpu()
    metadata = {"format": FORMAT, "step": str(step), "optim": json.dumps(optim),
                "extra": json.dumps(extra or {})}  # fmt: skip
    return atomic_write_bytes(path, encode_safetensors(tensors, metadata))


def load_state(
    path: str | Path,
    expected_sha256: str,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    rng: torch.Generator,
    verify: bool = True,
    rank: int = 0,
) -> tuple[int, dict]:
    """Restore modules, optimisers and the random streams (those of `rank` for the global ones)
    in place; return the step and extra."""
    tensors, metadata, _ = read_safetensors(path, expected_sha256, verify)
    if metadata.get("format") != FORMAT:
        raise DisbackError(f"{path}: not a disback training-state file")
    for name, module in modules.items():
        prefix = f"module.{name}."
        weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_weights(module, weights, f"{path} [{name}]")
    optim = json.loads(metadata["optim"])
    for name, opt in optimizers.items():
        _unpack_optimizer(name, opt, optim[name], tensors)
    rng.set_state(tensors["rng"])
    if _rng_key("cpu", rank) not in tensors:
        raise DisbackError(f"{path}: no random state for rank {rank} (saved with fewer ranks)")
    torch.set_rng_state(tensors[_rng_key("cpu", rank)])
    if _rng_key("cuda", rank) in tensors and rng.device.type == "cuda":
        torch.cuda.set_rng_state(tensors[_rng_key("cuda", rank)], rng.device)
    return int(metadata["step"]), json.loads(metadata.get("extra", "{}"))
