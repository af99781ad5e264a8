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

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import atomic_write_chunks
from disback_cli.store.tensorfile import (
    load_weights,
    read_safetensors,
    safetensors_chunks,
    tensors_of,
)

FORMAT = "disback.state"


def _pack_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict) -> dict:
    """Adam's per-parameter state into `tensors` (all of it is tensors: moments and step
    counts); the hyper-parameters into the metadata, for reading only (a resume keeps the run's
    own)."""
    state_dict = opt.state_dict()
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimiser state {key!r} is not a tensor")
            tensors[f"optim.{name}.{index}.{key}"] = value.detach().cpu().contiguous()
    return {"param_groups": state_dict["param_groups"]}


OPTIMIZER_TENSORS = {"step": False, "exp_avg": True, "exp_avg_sq": True}  # field: param-shaped


def _unpack_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, source: str) -> None:
    """Restore Adam's moments and step counts; the hyper-parameters stay those of the run's
    configuration (a state file cannot change the learning rate). Every tensor is checked:
    known fields only, the parameter's shape, finite values."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        index, _, field = key[len(prefix) :].partition(".")
        if not index.isdigit() or int(index) >= len(params) or field not in OPTIMIZER_TENSORS:
            raise DisbackError(f"{source}: unexpected optimiser tensor {key[:80]!r}")
        shape = params[int(index)].shape if OPTIMIZER_TENSORS[field] else ()
        if value.shape != shape or not value.is_floating_point():
            raise DisbackError(f"{source}: optimiser tensor {key} has the wrong shape or type")
        if not bool(torch.isfinite(value).all()) or (
            field != "exp_avg" and bool((value < 0).any())
        ):
            raise DisbackError(f"{source}: optimiser tensor {key} holds impossible values")
        state.setdefault(int(index), {})[field] = value
    if any(set(fields) != set(OPTIMIZER_TENSORS) for fields in state.values()):
        raise DisbackError(f"{source}: incomplete optimiser state for {name}")
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _check_rng(value: torch.Tensor | None, like: torch.Tensor, source: str, key: str) -> None:
    if value is None or value.dtype != torch.uint8 or value.shape != like.shape:
        raise DisbackError(f"{source}: random state {key} is missing or malformed")


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
    metadata = {
        "format": FORMAT,
        "step": str(step),
        "optim": json.dumps(optim),
        "extra": json.dumps(extra or {}),
    }
    return atomic_write_chunks(path, *safetensors_chunks(tensors, metadata))


def load_state(
    path: str | Path,
    expected_sha256: str,
    expected_step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    rng: torch.Generator,
    verify: bool = True,
    rank: int = 0,
) -> dict:
    """Restore modules, optimisers and the random streams (those of `rank` for the global ones)
    in place from the state at `expected_step`; return the loop's extra state. Everything read is
    checked first (a state file travels with a shared run)."""
    tensors, metadata, _ = read_safetensors(path, expected_sha256, verify)
    if metadata.get("format") != FORMAT:
        raise DisbackError(f"{path}: not a disback training-state file")
    if metadata.get("step") != str(expected_step):
        raise DisbackError(f"{path}: holds step {metadata.get('step')!r:.20}, not {expected_step}")
    try:  # plain json: `extra` of earlier disback builds may hold an infinity
        extra = json.loads(metadata.get("extra", "{}"))
    except (ValueError, RecursionError) as exc:
        raise DisbackError(f"{path}: unreadable loop state ({exc})") from None
    if not isinstance(extra, dict):
        raise DisbackError(f"{path}: loop state is not a JSON object")
    for name, module in modules.items():
        prefix = f"module.{name}."
        weights = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        load_weights(module, weights, f"{path} [{name}]")
    for name, opt in optimizers.items():
        _unpack_optimizer(name, opt, tensors, str(path))
    _check_rng(tensors.get("rng"), rng.get_state(), str(path), "rng")
    cpu_key, cuda_key = _rng_key("cpu", rank), _rng_key("cuda", rank)
    if cpu_key not in tensors:
        raise DisbackError(f"{path}: no random state for rank {rank} (saved with fewer ranks)")
    _check_rng(tensors[cpu_key], torch.get_rng_state(), str(path), cpu_key)
    use_cuda = cuda_key in tensors and rng.device.type == "cuda"
    if use_cuda:
        _check_rng(tensors[cuda_key], torch.cuda.get_rng_state(rng.device), str(path), cuda_key)
    rng.set_state(tensors["rng"])
    torch.set_rng_state(tensors[cpu_key])
    if use_cuda:
        torch.cuda.set_rng_state(tensors[cuda_key], rng.device)
    return extra
