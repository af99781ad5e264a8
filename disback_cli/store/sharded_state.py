"""A sharded run's resume point: torch.distributed.checkpoint (DCP) writing safetensors.

Every process writes its shards of the weights and Adam moments into one safetensors file of a
folder (DCP's Hugging Face storage: where each shard belongs is in the files' JSON headers;
nothing is pickled, unlike DCP's default `.metadata`); rank 0 adds `extra.json` (step, loop
state). The random streams of every rank are stored as tensors. The folder is written under a
temporary name and renamed when complete, so a crash leaves the previous resume point or the new
one; its sha256 (over the names and hashes of its files) goes into the manifest like a file's.
Reading goes through DCP as well, which re-splits the shards for the reading processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.store.fileio import (
    atomic_write_bytes,
    fsync_directory,
    parse_json,
    sha256_file,
)
from disback_cli.store.layout import BUNDLE_FILES

EXTRA = "extra.json"
FORMAT = "disback.sharded-state"
MAX_EXTRA_BYTES = 1 << 20
MAX_FILES = 1 << 16  # shard files in one resume point (one per process)


def _flat_state(modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]):
    """Weights and Adam state as one flat dict of (sharded) tensors; optimisers are those of
    the modules of the same name."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    flat: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in get_model_state_dict(module).items():
            flat[f"module.{name}.{key}"] = value
    optim = {}
    for name, opt in optimizers.items():
        optim[name] = get_optimizer_state_dict(modules[name], opt)
        for fqn, fields in optim[name]["state"].items():
            for field, value in fields.items():
                flat[f"optim.{name}.{fqn}.{field}"] = value
    return flat, optim


def file_groups(flat: dict[str, torch.Tensor]) -> dict[str, int]:
    """Which file of its process each tensor goes to: one file per network and per Adam moment
    (DCP holds a file's tensors in memory twice while it writes it, so smaller files keep a
    save's extra memory to about two of its shards of one network)."""
    groups: dict[str, int] = {}
    return {key: groups.setdefault(_group(key), len(groups) + 1) for key in flat}


def _group(key: str) -> str:
    """'module.NAME' for weights, 'NAME.FIELD' for an optimiser's moments, 'rng.KIND'."""
    parts = key.split(".")
    return f"{parts[1]}.{parts[-1]}" if parts[0] == "optim" else ".".join(parts[:2])


def bundle_digest(path: Path) -> str:
    """sha256 over the sorted names and sha256s of a resume point folder's files."""
    lines = []
    entries = sorted(path.iterdir())
    if len(entries) > MAX_FILES:
        raise DisbackError(f"{path}: more than {MAX_FILES} files")
    for entry in entries:
        if entry.is_symlink() or not entry.is_file() or not BUNDLE_FILES.fullmatch(entry.name):
            raise DisbackError(f"{path}: holds {entry.name!r}, which disback did not write")
        lines.append(f"{entry.name} {sha256_file(entry)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _shared_name(ex, make) -> str:
    """A value rank 0 makes, known to every process."""
    box = [make() if ex.is_main else None]
    if ex.distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded_state(
    path: Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    rng: torch.Generator,
    extra: dict,
    rank_rng: list[dict[str, torch.Tensor]],
    ex,
) -> str:
    """Write the resume point folder `path` from every process; return its digest (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    flat, _ = _flat_state(modules, optimizers)
    flat["rng.run"] = rng.get_state().cpu()
    for rank, state in enumerate(rank_rng):
        for kind, value in state.items():
            flat[f"rng.{kind}.rank{rank}"] = value.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(
        _shared_name(
            ex, lambda: tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        )
    )
    flat = dict(sorted(flat.items()))  # the same files whatever order the state was built in
    writer = HuggingFaceStorageWriter(
        str(temporary), fqn_to_index_mapping=file_groups(flat), save_distributed=True
    )
    dcp.save(flat, storage_writer=writer)
    ex.barrier()
    if not ex.is_main:
        return ""
    record = {"format": FORMAT, "step": step, "world_size": ex.world_size, "extra": extra}
    atomic_write_bytes(temporary / EXTRA, json.dumps(record, sort_keys=True).encode())
    digest = bundle_digest(temporary)
    os.replace(temporary, path)
    fsync_directory(path.parent)
    return digest


def load_sharded_state(
    path: Path,
    expected_sha256: str,
    expected_step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    rng: torch.Generator,
    verify: bool,
    ex,
) -> dict:
    """Restore the sharded modules, optimisers and random streams from the folder `path`;
    return the loop's extra state. The folder is checked (its digest on rank 0, agreed by all)
    before DCP reads anything from it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    problem = ""
    if ex.is_main:
        try:
            if verify and bundle_digest(path) != expected_sha256:
                problem = f"{path}: sha256 differs from the manifest's (modified or corrupt)"
        except (DisbackError, OSError) as exc:
            problem = str(exc)
    problem = _shared_name(ex, lambda: problem)
    if problem:
        raise DisbackError(problem)
    record = _read_extra(path, expected_step, ex.world_size)
    flat, optim = _flat_state(modules, optimizers)
    flat["rng.run"] = rng.get_state().cpu().clone()
    mine = {k: v.clone() for k, v in _rng_keys(ex).items()}
    flat.update(mine)
    try:
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(path)))
    except Exception as exc:  # a file of another run, or damaged: DCP names the key
        first = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
        raise DisbackError(f"{path}: cannot restore the sharded state ({first})") from None
    for name, module in modules.items():
        prefix = f"module.{name}."
        set_model_state_dict(
            module, {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
        )
    for name, opt in optimizers.items():
        set_optimizer_state_dict(modules[name], opt, optim[name])
    rng.set_state(flat["rng.run"])
    torch.set_rng_state(flat[f"rng.cpu.rank{ex.rank}"])
    if f"rng.cuda.rank{ex.rank}" in flat:
        torch.cuda.set_rng_state(flat[f"rng.cuda.rank{ex.rank}"], rng.device)
    return record["extra"]


def _rng_keys(ex) -> dict[str, torch.Tensor]:
    """Destinations for this process's global streams (the shapes of its own)."""
    keys = {f"rng.cpu.rank{ex.rank}": torch.get_rng_state()}
    if ex.device.type == "cuda":
        keys[f"rng.cuda.rank{ex.rank}"] = torch.cuda.get_rng_state(ex.device)
    return keys


def _read_extra(path: Path, step: int, world_size: int) -> dict:
    source = path / EXTRA
    if source.is_symlink() or not source.is_file() or source.stat().st_size > MAX_EXTRA_BYTES:
        raise DisbackError(f"{source}: missing, a link, or too large")
    record = parse_json(source.read_bytes())
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DisbackError(f"{source}: not a disback sharded-state record")
    if record.get("step") != step:
        raise DisbackError(f"{path}: holds step {str(record.get('step'))[:20]}, not {step}")
    if record.get("world_size") != world_size:
        raise DisbackError(
            f"{path}: saved by {str(record.get('world_size'))[:20]} processes, this run has "
            f"{world_size}"
        )
    if not isinstance(record.get("extra"), dict):
        raise DisbackError(f"{source}: loop state is not a JSON object")
    return record
