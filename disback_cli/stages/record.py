"""DisBack stage 1, degradation recording.

A copy of the teacher (the auxiliary model) is fine-tuned with the EDM denoising loss on samples of
the frozen initial generator G0. Checkpoints saved along the way form the degradation path:
node 0 is the teacher, node N fits G0.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import torch
from torch import nn

from disback_cli.config import RecordConfig
from disback_cli.config.resolve import resolve_record
from disback_cli.errors import ConfigError, DisbackError, InterruptedRun
from disback_cli.method.dsm import denoising_step, edm_loss_weight
from disback_cli.method.generator import build_g0, g0_spec
from disback_cli.method.noise import TrainingSigma
from disback_cli.method.sampling import draw_labels
from disback_cli.method.schedule import node_steps
from disback_cli.models.denoiser_files import DenoiserFile, load_denoiser, save_denoiser
from disback_cli.models.networks import eval_mode, set_dropout
from disback_cli.models.teachers import Teacher, open_teacher
from disback_cli.runtime.parallel import Execution, check_batch_fits, execution
from disback_cli.runtime.reporting import Reporter, SilentReporter
from disback_cli.runtime.signals import stop_on_signals
from disback_cli.stages.lifecycle import check_finite
from disback_cli.store.fileio import ensure_free_space
from disback_cli.store.layout import (
    BACKTRACK_FOLDER,
    MANIFEST,
    TRAJECTORY,
    check_no_links,
    node_file,
    record_state_file,
    refuse_foreign,
    remove_empty_folders,
    remove_ours,
)
from disback_cli.store.lock import run_lock
from disback_cli.store.manifests import (
    NodeRecord,
    StateRef,
    TeacherRef,
    TrajectoryManifest,
    now,
    read_manifest,
    write_manifest,
)
from disback_cli.store.statefile import load_state, local_rng_state, save_state
from disback_cli.store.tensorfile import tensor_bytes

PROBE_SAMPLES = 512
PROBE_SEED = 20240828  # fixed, so node distances compare across runs and seeds


def teacher_ref(teacher: Teacher) -> TeacherRef:
    return TeacherRef(
        source=teacher.source, sha256=teacher.sha256, network=teacher.spec, dataset=teacher.dataset
    )


def config_changes(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)
    ]


class PathProbe:
    """A fixed set of noised G0 samples on which the teacher and every node are measured: the
    mean |D - D_teacher| (how far along the path a node is) and the EDM denoising loss against
    the clean G0 samples (how well it fits G0). Networks see it in chunks of the training batch,
    so it needs no more memory than a training step."""

    def __init__(self, teacher: Teacher, g0: nn.Module, levels: TrainingSigma, chunk: int, device):
        rng = torch.Generator(device).manual_seed(PROBE_SEED)
        shape = (PROBE_SAMPLES, *teacher.spec.data_shape)
        self.chunk, self.sigma_data = chunk, teacher.denoiser.sigma_data
        self.labels = draw_labels(PROBE_SAMPLES, teacher.spec.label_dim, rng, device)
        z = torch.randn(shape, generator=rng, device=device)
        self.sigma = levels.sample(PROBE_SAMPLES, rng, device)
        noise = torch.randn(shape, generator=rng, device=device)
        with torch.no_grad():
            self.x0 = torch.cat([g0(z[i], self._labels(i)) for i in self._chunks()])
        self.x_t = self.x0 + self.sigma.reshape(-1, *[1] * (self.x0.ndim - 1)) * noise
        self.reference = self._denoise(teacher.denoiser)
        self.teacher_loss = self._loss(self.reference)

    def _chunks(self) -> list[slice]:
        return [slice(i, i + self.chunk) for i in range(0, PROBE_SAMPLES, self.chunk)]

    def _labels(self, rows: slice) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[rows]

    @torch.no_grad()
    def _denoise(self, denoiser: nn.Module) -> torch.Tensor:
        with eval_mode(denoiser):
            return torch.cat([denoiser(self.x_t[i], self.sigma[i], self._labels(i))
                              for i in self._chunks()])  # fmt: skip

    def _loss(self, denoised: torch.Tensor) -> float:
        weight = edm_loss_weight(self.sigma, self.sigma_data).reshape(-1, *[1] * (self.x0.ndim - 1))
        return (weight * (denoised - self.x0) ** 2).mean().item()

    def __call__(self, denoiser: nn.Module) -> tuple[float, float]:
        """(mean |D - D_teacher|, denoising loss on G0) of `denoiser`."""
        out = self._denoise(denoiser)
        return (out - self.reference).abs().mean().item(), self._loss(out)


def _start_or_resume(
    cfg: RecordConfig, out: Path, teacher: Teacher, ex: Execution, force: bool, reporter: Reporter
) -> TrajectoryManifest | None:
    """The manifest to continue from, or None to start fresh (after --force cleanup).

    A fresh recording needs a directory of its own; a resumed one only files disback wrote in
    its sub-folders. Files disback did not write are never deleted: the run is refused instead."""
    if not (out / MANIFEST).exists() and not (out / MANIFEST).is_symlink():
        refuse_foreign(out, TRAJECTORY, whole=True)
        ex.barrier()  # every rank has looked before rank 0 removes anything
        for path in remove_ours(out, TRAJECTORY) if ex.is_main else []:
            reporter.note(f"removed {path} (left by a recording killed before it started)")
        return None
    manifest = read_manifest(out, TrajectoryManifest)
    refuse_foreign(out, TRAJECTORY, whole=False)
    changes = config_changes(manifest.config.identity(), cfg.identity())
    if manifest.teacher.sha256 != teacher.sha256:
        changes.append("teacher weights (sha256) differ")
    if manifest.world_size != ex.world_size:
        changes.append(f"processes: {manifest.world_size} -> {ex.world_size} (global batch)")
    if not changes:
        return manifest
    if not force:
        raise ConfigError(
            f"{out} was recorded with another configuration ({'; '.join(changes)}); "
            "pass --force to record it again from scratch, or choose another --out"
        )
    runs = out / BACKTRACK_FOLDER
    if runs.is_symlink() or (runs.is_dir() and any(runs.iterdir())):
        raise ConfigError(f"{out} has backtrack runs that depend on its path; choose another --out")
    reporter.note(f"--force: discarding the previous recording in {out}")
    ex.barrier()  # every rank has read the old manifest
    if ex.is_main:
        remove_ours(out, TRAJECTORY)  # the manifest first, then its nodes and states
    return None


PLAN_CHECKS = 100  # probe distances measured while planning nodes by distance


def _fresh_run(cfg: RecordConfig, teacher: Teacher, ex: Execution):
    """Auxiliary model, optimiser and random streams exactly as at iteration 0."""
    aux = copy.deepcopy(teacher.denoiser).train().requires_grad_(True)
    set_dropout(aux, cfg.dropout)
    ex.prepare(aux)
    optimizer = torch.optim.Adam(aux.parameters(), lr=cfg.lr, betas=cfg.betas, foreach=True)
    rng = torch.Generator(ex.device).manual_seed(cfg.seed)  # the same stream on every rank
    torch.manual_seed(ex.rank_seed(cfg.seed))  # dropout: one stream per rank, saved with state
    return aux, optimizer, rng


def plan_by_distance(
    cfg: RecordConfig, teacher: Teacher, g0, probe, ex: Execution, reporter
) -> list[int]:
    """Node steps such that node i is the first checkpoint at >= i/N of the final distance from
    the teacher. A dry run of the (deterministic) recording measures the distances; the real run
    repeats it and saves at the planned steps."""
    aux, optimizer, rng = _fresh_run(cfg, teacher, ex)
    shape = (cfg.batch, *teacher.spec.data_shape)
    every = max(1, cfg.iters // max(PLAN_CHECKS, 4 * cfg.nodes))
    distances: list[tuple[int, float]] = []
    reporter.start("plan nodes", cfg.iters, 0)
    for step in range(1, cfg.iters + 1):
        denoising_step(aux, optimizer, g0, shape, teacher.spec.label_dim, TrainingSigma.of(cfg),
                       rng, ex=ex)  # fmt: skip
        if step % every == 0 or step == cfg.iters:
            distances.append((step, probe(aux)[0]))
            reporter.advance(step)
    final = distances[-1][1]
    plan, candidates = [], iter(distances)
    for i in range(1, cfg.nodes + 1):
        for step, distance in candidates:
            if distance >= i / cfg.nodes * final or step == cfg.iters:
                plan.append(step)
                break
    if len(plan) < cfg.nodes:
        reporter.note("too few distinct checkpoints for placement by distance; placing evenly")
        return node_steps(cfg.iters, cfg.nodes)[1:]
    return plan


def run_record(
    cfg: RecordConfig,
    out: str | Path,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
) -> TrajectoryManifest:
    """Record (or resume recording) the degradation path into the directory `out`.

    Under torchrun every process calls this; rank 0 alone writes files and reports progress."""
    out = Path(out)
    ex = execution(cfg)
    reporter = (reporter or SilentReporter()) if ex.is_main else SilentReporter()
    teacher = open_teacher(cfg.teacher, ex.device)
    student = load_denoiser(cfg.student) if cfg.student is not None else None
    cfg, sources = resolve_record(cfg, teacher, student)
    check_batch_fits(cfg.batch, teacher.spec.data_shape, ex)
    lock = run_lock(out, "record", reporter) if ex.is_main else contextlib.nullcontext()
    with lock:
        return _record(cfg, sources, out, teacher, student, ex, force, reporter)


def _record(
    cfg: RecordConfig, sources: dict[str, str], out: Path, teacher: Teacher,
    student: DenoiserFile | None, ex: Execution, force: bool, reporter: Reporter,
) -> TrajectoryManifest:  # fmt: skip
    device = ex.device
    manifest = _start_or_resume(cfg, out, teacher, ex, force, reporter)
    if manifest is not None and manifest.status == "complete":
        reporter.note(f"{out}: recording already complete, nothing to do")
        return manifest

    g0_init = manifest.generator_init if manifest is not None else g0_spec(cfg, teacher, student)
    g0, _ = build_g0(g0_init, teacher, device, cfg.verify)
    levels = TrainingSigma.of(cfg)
    probe = PathProbe(teacher, g0, levels, cfg.batch, device)
    plan = manifest.node_plan if manifest is not None else None
    if plan is None:
        plan = node_steps(cfg.iters, cfg.nodes)[1:]
        if cfg.placement == "distance":
            plan = plan_by_distance(cfg, teacher, g0, probe, ex, reporter)
    node_at_step = {s: i for i, s in enumerate(plan, start=1)}
    ex.prepare(g0.denoiser)
    aux, optimizer, rng = _fresh_run(cfg, teacher, ex)
    losses = LossMeans()
    # Room for the remaining nodes and two resume points (weights + two Adam moments each).
    start = manifest.state.step if manifest is not None and manifest.state else 0
    needed = tensor_bytes(aux) * (sum(s > start for s in plan) + 2 * 3)
    if ex.is_main:
        ensure_free_space(out, needed, "the remaining path nodes and resume points")

    if manifest is None:
        teacher_node = NodeRecord(index=0, step=0, file=None, sha256=teacher.sha256,
                                  dist_to_teacher=0, g0_loss=probe.teacher_loss)  # fmt: skip
        stamp = now()
        manifest = TrajectoryManifest(
            created_at=stamp,
            updated_at=stamp,
            status="recording",
            teacher=teacher_ref(teacher),
            generator_init=g0_init,
            node_plan=plan,
            config=cfg,
            nodes=[teacher_node],
            world_size=ex.world_size,
            global_batch=ex.global_batch(cfg.batch),
        )
        if ex.is_main:
            write_manifest(out, manifest)
        step = 0
    else:
        if manifest.state is None:
            step = 0
            manifest.nodes = manifest.nodes[:1]
        else:
            step, ref = manifest.state.step, manifest.state
            extra = load_state(check_no_links(out, ref.file), ref.sha256, step, {"aux": aux},
                               {"aux": optimizer}, rng, cfg.verify, ex.rank)  # fmt: skip
            losses.load_state_dict(extra.get("losses", {}), str(out / ref.file))
            reporter.note(f"resuming {out} from iteration {step}")
        keep = {MANIFEST} | {n.file for n in manifest.nodes if n.file}
        keep |= {manifest.state.file} if manifest.state else set()
        for path in remove_ours(out, TRAJECTORY, keep) if ex.is_main else []:
            reporter.note(f"removed {path} (written after the last resume point)")
    manifest.config, manifest.config_sources = cfg, sources

    shape = (cfg.batch, *teacher.spec.data_shape)
    node_dtype = torch.bfloat16 if cfg.node_dtype == "bf16" else None
    started, elapsed_before = time.perf_counter(), manifest.elapsed_seconds
    with stop_on_signals() as stop:
        reporter.start("record", cfg.iters, step)
        while step < cfg.iters:
            loss, grad_norm = denoising_step(aux, optimizer, g0, shape, teacher.spec.label_dim,
                                             levels, rng, ex=ex)  # fmt: skip
            step += 1
            check_finite(step, out, manifest.state, ex.any, loss=loss, grad_norm=grad_norm)
            losses.add(ex.mean(loss.detach()).item())
            reporter.advance(step, loss=loss.item())

            node = node_at_step.get(step)
            if node is not None:
                file = node_file(node)
                info = {
                    "role": "path_node",
                    "index": node,
                    "step": step,
                    "dataset": teacher.dataset,
                    "train_sigma": teacher.train_sigma,
                    "teacher_sha256": teacher.sha256,
                }
                digest = ""  # known to rank 0, which writes the manifest
                if ex.is_main:
                    digest = save_denoiser(out / file, aux, teacher.spec, info, node_dtype)
                distance, g0_loss = probe(aux)
                record = NodeRecord(index=node, step=step, file=file, sha256=digest,
                                    dist_to_teacher=distance, g0_loss=g0_loss,
                                    train_loss=losses.take())  # fmt: skip
                manifest.nodes.append(record)
            periodic = cfg.save_every and step % cfg.save_every == 0
            stopping = ex.any(stop.requested)
            if (node is not None or periodic or stopping) and step < cfg.iters:
                manifest.elapsed_seconds = elapsed_before + time.perf_counter() - started
                _save_resume_point(out, manifest, step, aux, optimizer, rng, losses, ex)
                if stopping:
                    raise InterruptedRun(
                        f"{stop.signal_name or 'a stop request'} at iteration {step}: state "
                        f"saved in {out}; run the same command again to resume"
                    )

    manifest.status = "complete"
    manifest.elapsed_seconds = elapsed_before + time.perf_counter() - started
    manifest.state = None
    if ex.is_main:
        write_manifest(out, manifest)
        remove_ours(out, TRAJECTORY, {MANIFEST} | {n.file for n in manifest.nodes if n.file})
        remove_empty_folders(out, TRAJECTORY)  # state/ goes if it held only resume points
    return manifest


FIT_MARGIN = 0.95  # node N must cut the teacher's denoising loss on G0 by at least 5 %


def fit_warning(nodes: list[NodeRecord]) -> str | None:
    """One line when node N is not clearly closer to G0 than the teacher: the path then barely
    leaves the teacher, and backtracking along it is plain distillation with extra steps.
    (`disback record` prints it even with --json, on stderr, and lists it in its JSON.)"""
    first, last = nodes[0].g0_loss, nodes[-1].g0_loss
    if first is None or last is None or last <= FIT_MARGIN * first:
        return None
    return (
        f"node {nodes[-1].index} is not clearly closer to G0 than the teacher "
        f"(denoising loss on G0 samples {last:.4g} vs the teacher's {first:.4g}); "
        "record with more --iters or a higher --lr"
    )


class LossMeans:
    """Mean training loss between two nodes, carried across resume points."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        self.total, self.count = self.total + value, self.count + 1

    def take(self) -> float | None:
        mean = self.total / self.count if self.count else None
        self.total, self.count = 0.0, 0
        return mean

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: object, where: str) -> None:
        """`state` comes from a file: anything but a finite total and a count is refused. An
        empty one (state files from before the means were kept) starts from nothing."""
        state = state or {"total": 0.0, "count": 0}
        ok = isinstance(state, dict) and set(state) == {"total", "count"}
        total, count = (state["total"], state["count"]) if ok else (None, None)
        if not (type(count) is int and 0 <= count <= 1 << 40 and type(total) in (int, float)
                and math.isfinite(total) and total >= 0):  # fmt: skip
            raise DisbackError(f"{where}: malformed loss means in the recording state")
        self.total, self.count = float(total), count


def _save_resume_point(out, manifest, step, aux, optimizer, rng, losses, ex: Execution) -> None:
    """Write a new state file, point the manifest at it, then drop the previous one."""
    file = record_state_file(step)
    rank_rng = ex.gather(local_rng_state(ex.device))
    digest = ""  # known to rank 0, which writes the files
    if ex.is_main:
        digest = save_state(out / file, step, {"aux": aux}, {"aux": optimizer}, rng,
                            {"losses": losses.state_dict()}, rank_rng)  # fmt: skip
    previous, manifest.state = manifest.state, StateRef(file=file, sha256=digest, step=step)
    if ex.is_main:
        write_manifest(out, manifest)
        if previous is not None and previous.file != file:
            (out / previous.file).unlink(missing_ok=True)
