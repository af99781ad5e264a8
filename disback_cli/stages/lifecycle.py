"""One resumable training run, written once for every stage: `record`, `backtrack` and any stage
added later get locking, resume, crash safety and torchrun from here, so that their own code holds
only their algorithm.

A run lives in one directory of a known `Layout`, with a manifest that names (and hashes) every
file of the run. Its life:

    with Run(directory, RECORDING, ex, reporter) as run:        # lock (rank 0)
        previous = run.start_or_resume(cfg, force)               # manifest to continue, or None
        ...build the networks, TrainingState...
        run.begin(previous or new_manifest, state, cfg, sources) # write it, or restore the state
        for step in run.iterations("record", cfg.iters, ...):    # stop signals, resume points
            ...one iteration of the algorithm...

Crash safety: every file is written atomically, the manifest last, and the files the manifest no
longer names are removed only after it has moved on; a resume removes what was written after the
last resume point. A stop signal ends the run at the next save boundary with its state saved
(`InterruptedRun`, exit code 130); rerunning the same command continues it bit for bit.
Under torchrun every rank runs the same calls; rank 0 alone writes files and reports.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from disback_cli.errors import ConfigError, DisbackError, InterruptedRun
from disback_cli.runtime.parallel import Execution
from disback_cli.runtime.reporting import Reporter
from disback_cli.runtime.signals import stop_on_signals
from disback_cli.store.fileio import ensure_free_space
from disback_cli.store.layout import (
    BACKTRACK,
    EVALUATIONS,
    MANIFEST,
    METRICS,
    TRAJECTORY,
    Layout,
    check_no_links,
    refuse_foreign,
    remove_empty_folders,
    remove_file_or_bundle,
    remove_ours,
)
from disback_cli.store.lock import run_lock
from disback_cli.store.manifests import (
    BacktrackManifest,
    RunManifest,
    StateRef,
    TrajectoryManifest,
    read_manifest,
    write_manifest,
)
from disback_cli.store.metrics_log import truncate_metrics
from disback_cli.store.sharded_state import load_sharded_state, save_sharded_state
from disback_cli.store.statefile import load_state, local_rng_state, save_state


@dataclass(frozen=True)
class RunKind:
    """What differs between stages in their run directories, and in the words about them."""

    layout: Layout  # the files the stage writes
    manifest: type[RunManifest]  # its manifest model
    command: str  # names the lock holder
    noun: str  # "the previous recording in ..."
    past: str  # "... was recorded with another configuration"
    redo: str  # "pass --force to record it again"
    elsewhere: str  # "or choose another --out"
    running: str  # manifest status while training
    extendable: tuple[str, ...] = ()  # config fields a resume may raise (backtrack: iters)
    final_state: bool = False  # a finished run keeps its last state (to be extended later)
    metrics_log: bool = False  # keeps metrics.jsonl, cut back to the resume point on resume


RECORDING = RunKind(
    TRAJECTORY,
    TrajectoryManifest,
    "record",
    "recording",
    "recorded",
    "record",
    "--out",
    "recording",
)
BACKTRACKING = RunKind(
    BACKTRACK,
    BacktrackManifest,
    "backtrack",
    "run",
    "trained",
    "train",
    "--name",
    "running",
    extendable=("iters",),
    final_state=True,
    metrics_log=True,
)


class WholeState:
    """A resume point as one safetensors file, written by rank 0 (`store.statefile`)."""

    def name(self, layout: Layout, step: int) -> str:
        return layout.state_file(step)

    def save(self, path: Path, step: int, state: TrainingState, extra, rank_rng, ex) -> str:
        if not ex.is_main:
            return ""
        return save_state(path, step, state.modules, state.optimizers, state.rng, extra, rank_rng)

    def load(self, path: Path, ref: StateRef, state: TrainingState, verify: bool, ex) -> dict:
        return load_state(
            path, ref.sha256, ref.step, state.modules, state.optimizers, state.rng, verify, ex.rank
        )


class ShardedState(WholeState):
    """A resume point as a folder of shards, one per process (`store.sharded_state`)."""

    def name(self, layout: Layout, step: int) -> str:
        return layout.sharded_state_file(step)

    def save(self, path: Path, step: int, state: TrainingState, extra, rank_rng, ex) -> str:
        return save_sharded_state(
            path, step, state.modules, state.optimizers, state.rng, extra, rank_rng, ex
        )

    def load(self, path: Path, ref: StateRef, state: TrainingState, verify: bool, ex) -> dict:
        return load_sharded_state(
            path, ref.sha256, ref.step, state.modules, state.optimizers, state.rng, verify, ex
        )


STATE_STORES = {False: WholeState(), True: ShardedState()}  # by whether networks are sharded


class Stateful(Protocol):
    """Loop state saved with the weights (the switching rule, running means)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, source: str) -> None: ...


@dataclass
class TrainingState:
    """Everything a resume point holds: weights, optimiser moments, the run's random stream (the
    global torch stream, which dropout draws from, is saved per rank beside it) and loop state."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    rng: torch.Generator
    loop: dict[str, Stateful] = field(default_factory=dict)


def make_optimizer(
    params, lr: float, betas: tuple[float, float], name: str = "adam", weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam, or AdamW with decoupled weight decay. foreach: one fused update over all tensors
    (the default on CUDA; on the CPU it saves the per-tensor Python loop)."""
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True
        )
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def warm_up(optimizers, step: int, warmup: int) -> None:
    """Linear learning-rate warm-up: iteration `step` (from 1) at min(1, step / warmup) of each
    rate. A function of the iteration alone, so a resume needs no state for it. (DMD2's
    `constant_with_warmup` scheduler starts at 0, a first step that does nothing.)"""
    if not warmup:
        return
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group.setdefault("peak_lr", group["lr"])
            group["lr"] = group["peak_lr"] * min(1.0, step / warmup)


def seed_streams(seed: int, ex: Execution) -> torch.Generator:
    """The run's random stream (the same on every rank: each draws the global batch and keeps
    its slice) and the global torch stream (dropout: one per rank)."""
    rng = torch.Generator(ex.device).manual_seed(seed)
    torch.manual_seed(ex.rank_seed(seed))
    return rng


def config_changes(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)
    ]


def check_finite(
    iteration: int, directory, state, any_rank=lambda bad: bad, **values: torch.Tensor
) -> None:
    """Stop a run whose loss or gradient norm is NaN or infinite, before anything is saved.

    One device-to-host sync per call; the message names the run's latest resume point `state`
    (in `directory`), which stays intact; `any_rank` makes all processes of a data-parallel run
    stop together."""
    flags = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if not any_rank(not bool(torch.isfinite(flags).all())):
        return
    shown = ", ".join(f"{k} {v.item():.4g}" for k, v in values.items())
    last_good = (
        "no checkpoint had been saved yet"
        if state is None
        else f"last good checkpoint {directory / state.file} (iteration {state.step}) is intact"
    )
    raise DisbackError(
        f"diverged at iteration {iteration} ({shown}); nothing from it was saved; {last_good}; "
        "lower the learning rate or set --grad-clip and restart with --force"
    )


class Run:
    """A stage's run directory while it trains (see the module docstring for the order of calls).

    `manifest` is the run's manifest once `begin` has been called; stages add their own records to
    it (path nodes, generator files) and `save` writes it."""

    def __init__(self, directory: Path, kind: RunKind, ex: Execution, reporter: Reporter) -> None:
        self.directory, self.kind, self.ex, self.reporter = Path(directory), kind, ex, reporter
        self.manifest: Any = None  # the stage's RunManifest, once `begin` has run
        self._previous: Any = None  # the manifest being resumed, once read
        self.state: TrainingState | None = None
        self.store = STATE_STORES[ex.layout.sharded]
        self._resuming = False
        self._save_requested = False
        self._clock = (0.0, time.perf_counter())  # seconds before this process, its start
        self._exits = contextlib.ExitStack()

    def __enter__(self) -> Run:
        if self.ex.is_main:  # one process per run directory
            lock = run_lock(self.directory, self.kind.command, self.reporter.note)
            self._exits.enter_context(lock)
        return self

    def __exit__(self, kind, exc, traceback) -> None:
        self._exits.close()  # stop-signal handlers first, then the lock
        if kind is KeyboardInterrupt:  # outside the iterations, or a second stop signal
            raise InterruptedRun(self._what_was_kept()) from None

    def _what_was_kept(self) -> str:
        """What an interruption leaves: the last resume point written, or nothing to resume."""
        manifest = self.manifest if self.manifest is not None else self._previous
        ref = None if manifest is None else manifest.state
        if ref is None:
            return (
                f"interrupted before the first resume point of the {self.kind.noun} in "
                f"{self.directory}: nothing to resume; run the same command again to start it"
            )
        return (
            f"interrupted: {self.directory} keeps its resume point at iteration {ref.step}; "
            "run the same command again to resume from it"
        )

    def note(self, text: str) -> None:
        self.reporter.note(text)

    def start_or_resume(
        self,
        cfg,
        force: bool,
        changes: Callable[[Any], list[str]] = lambda manifest: [],
        before_discard: Callable[[], None] = lambda: None,
    ):
        """The manifest to continue from, or None to start afresh (after --force cleanup).

        A resume must have the configuration the run was started with (`changes` adds the
        stage's own checks, e.g. the teacher's hash); otherwise it is refused, or with --force
        the run's files are removed (`before_discard` may refuse first). A fresh run needs a
        directory of its own; a resumed one only files disback wrote in its sub-folders. Files
        disback did not write are never deleted: the run is refused instead."""
        directory, layout, kind = self.directory, self.kind.layout, self.kind
        manifest_path = directory / MANIFEST
        if not manifest_path.exists() and not manifest_path.is_symlink():
            refuse_foreign(directory, layout, whole=True)
            self.ex.barrier()  # every rank has looked before rank 0 removes anything
            for path in remove_ours(directory, layout) if self.ex.is_main else []:
                self.note(f"removed {path} (left by a {kind.noun} killed before it started)")
            return None
        manifest = self._previous = read_manifest(directory, kind.manifest)
        refuse_foreign(directory, layout, whole=False)
        unset = dict.fromkeys(kind.extendable)
        found = config_changes({**manifest.config.identity(), **unset}, {**cfg.identity(), **unset})
        found += changes(manifest)
        if manifest.world_size != self.ex.world_size:
            found.append(f"processes: {manifest.world_size} -> {self.ex.world_size} (global batch)")
        if not found:
            self._resuming = True
            return manifest
        if not force:
            raise ConfigError(
                f"{directory} was {kind.past} with another configuration ({'; '.join(found)}); "
                f"pass --force to {kind.redo} it again from scratch, or choose another "
                f"{kind.elsewhere}"
            )
        before_discard()
        self.note(f"--force: discarding the previous {kind.noun} in {directory}")
        self.ex.barrier()  # every rank has read the old manifest
        if self.ex.is_main:
            remove_ours(directory, layout)  # the manifest first, then the files it named
        return None

    def finished(self, manifest, cfg) -> bool:
        """Whether `manifest` is a finished run of `cfg` (rerunning it is a no-op)."""
        if manifest is None or manifest.status != "complete":
            return False
        if any(getattr(manifest.config, k) != getattr(cfg, k) for k in self.kind.extendable):
            return False
        self.note(f"{self.directory}: {self.kind.noun} already complete, nothing to do")
        manifest.session.update(noop=True, iterations_run=0)
        return True

    def ensure_space(self, needed: int, what: str) -> None:
        if self.ex.is_main:
            ensure_free_space(self.directory, needed, what)

    def begin(self, manifest, state: TrainingState, cfg, sources: dict[str, str]) -> int:
        """Write a fresh manifest, or restore `state` from the resume point of the one being
        resumed and remove the files written after it. Returns the iteration to start from."""
        self.manifest, self.state, step = manifest, state, 0
        if not self._resuming:
            if self.ex.is_main:
                write_manifest(self.directory, manifest)
        else:
            ref = manifest.state
            if ref is not None:
                step = ref.step
                source = check_no_links(self.directory, ref.file)
                extra = self.store.load(source, ref, state, cfg.verify, self.ex)
                for key, loop_state in state.loop.items():
                    loop_state.load_state_dict(extra.get(key, {}), str(self.directory / ref.file))
                self.note(f"resuming {self.directory} from iteration {step}")
            if self.ex.is_main:
                keep = {MANIFEST} | manifest.files()
                if self.kind.metrics_log:
                    truncate_metrics(self.directory / METRICS, step)
                    keep |= {METRICS, EVALUATIONS}  # reports name their generator by sha256
                for path in remove_ours(self.directory, self.kind.layout, keep):
                    self.note(f"removed {path} (written after the last resume point)")
            manifest.status = self.kind.running
        manifest.config, manifest.config_sources = cfg, sources
        return step

    def elapsed(self) -> float:
        """Seconds of training so far, over every process that worked on the run."""
        before, started = self._clock
        return before + time.perf_counter() - started

    def check_finite(self, step: int, **values: torch.Tensor) -> None:
        check_finite(step, self.directory, self.manifest.state, self.ex.any, **values)

    def request_save(self) -> None:
        """Save a resume point at the end of this iteration (e.g. right after a path node)."""
        self._save_requested = True

    def iterations(
        self,
        description: str,
        start: int,
        total: int,
        save_every: int,
        stop_every: int = 1,
        outputs: Callable[[int], None] | None = None,
    ) -> Iterator[int]:
        """Iterations start+1 .. total; after each, a resume point when one is due: every
        `save_every` iterations, when requested, and when a stop signal arrived (checked every
        `stop_every` iterations, agreed on by all ranks), which then ends the run. `outputs(step)`
        writes the stage's own files of a resume point: every rank calls it, rank 0 writes. At
        `total` the run is complete."""
        self._clock = (self.manifest.elapsed_seconds, time.perf_counter())
        self.manifest.session.update(noop=False, resumed_from=start, iterations_run=0)
        stop = self._exits.enter_context(stop_on_signals())
        self.reporter.start(description, total, start)
        if self.ex.compile:  # the first forward builds the kernels, long before any report
            self.reporter.phase("compiling the networks (torch.compile: minutes on a CPU)")
        for step in range(start + 1, total + 1):
            yield step
            self.manifest.session["iterations_run"] = step - start
            last = step == total
            stopping = step % stop_every == 0 and self.ex.any(stop.requested)
            periodic = bool(save_every) and step % save_every == 0
            if last:
                self._complete(step, outputs)
            elif periodic or stopping or self._save_requested:
                self.reporter.phase(f"saving the resume point of iteration {step}")
                self.save(step, outputs)
            self._save_requested = False
            if stopping and not last:
                raise InterruptedRun(
                    f"{stop.signal_name or 'a stop request'} at iteration {step}: state "
                    f"saved in {self.directory}; run the same command again to resume"
                )

    def save(self, step: int, outputs: Callable[[int], None] | None = None) -> None:
        """A resume point at `step`: the stage's files, the training state, then the manifest;
        only then do the files the manifest no longer names go."""
        manifest, state = self.manifest, self.state
        manifest.elapsed_seconds = self.elapsed()
        for module in state.modules.values():  # sharded: what a forward left gathered
            self.ex.layout.settle(module)
        rank_rng = self.ex.gather(local_rng_state(self.ex.device))  # every rank takes part
        previous = manifest.files()
        file = self.store.name(self.kind.layout, step)
        if outputs is not None:
            outputs(step)  # on every rank: it gathers sharded networks for rank 0 to write
        extra = {key: loop_state.state_dict() for key, loop_state in state.loop.items()}
        digest = self.store.save(self.directory / file, step, state, extra, rank_rng, self.ex)
        manifest.state = StateRef(file=file, sha256=digest, step=step)  # digest: on rank 0
        if self.ex.is_main:
            write_manifest(self.directory, manifest)
            for gone in previous - manifest.files():
                remove_file_or_bundle(self.directory, gone, self.kind.layout)

    def _complete(self, step: int, outputs: Callable[[int], None] | None) -> None:
        """Mark the run complete: with its last state (a run that may be extended), or as just
        the files it produced (a recording is its path nodes)."""
        self.manifest.status = "complete"
        if self.kind.final_state:
            self.save(step, outputs)
            return
        self.manifest.elapsed_seconds = self.elapsed()
        self.manifest.state = None
        if self.ex.is_main:
            write_manifest(self.directory, self.manifest)
            keep = {MANIFEST} | self.manifest.files()
            remove_ours(self.directory, self.kind.layout, keep)
            remove_empty_folders(self.directory, self.kind.layout)  # e.g. state/ of resume points
