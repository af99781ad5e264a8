"""DisBack stage 1, degradation recording (Algorithm 1 of the paper).

A copy of the teacher (the auxiliary model) is fine-tuned with the EDM denoising loss on samples of
the frozen initial generator G0. Checkpoints saved along the way form the degradation path:
node 0 is the teacher, node N fits G0.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from disback_cli.config import RecordConfig
from disback_cli.config.resolve import resolve_record
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.method.dsm import denoising_step
from disback_cli.method.generator import build_g0, g0_spec, load_student
from disback_cli.method.noise import TrainingSigma
from disback_cli.method.probe import PathProbe, probe_chunk
from disback_cli.method.schedule import node_steps
from disback_cli.models.denoiser_files import DenoiserFile
from disback_cli.models.networks import enable_checkpointing, set_dropout
from disback_cli.models.path_nodes import NodeFormat
from disback_cli.models.teachers import Teacher, open_teacher
from disback_cli.runtime.memory_plan import MemoryPlan
from disback_cli.runtime.parallel import Execution, check_batch_fits, cpu_threads, process_of
from disback_cli.runtime.reporting import Reporter
from disback_cli.runtime.sharding import WHOLE, Networks, refuse_unsupported
from disback_cli.stages.lifecycle import RECORDING, Run, TrainingState, make_optimizer, seed_streams
from disback_cli.store.layout import BACKTRACK_FOLDER, node_file
from disback_cli.store.manifests import NodeRecord, PromptsRef, TrajectoryManifest, now
from disback_cli.store.tensorfile import tensor_bytes


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
    ex, reporter = process_of(cfg, reporter)
    # Whole, or (--parallel fsdp|hsdp) sharded as it is read; the other networks are made from it.
    reporter.phase(f"opening the teacher {cfg.teacher}")
    teacher, networks = ex.layout.place_teacher(
        lambda: open_teacher(cfg.teacher, ex.device), ex.device
    )
    student = load_student(cfg.student, teacher) if cfg.student is not None else None
    cfg, sources = resolve_record(cfg, teacher, student)
    node_format = teacher.family.node_format(cfg)
    refuse_unsupported(cfg, [(not node_format.shardable, "--lora-rank (adapter nodes)")])
    warnings = teacher.family.record_warnings(cfg)  # said before anything runs
    for warning in warnings if ex.is_main else []:
        reporter.warn(warning)
    torch.set_num_threads(cpu_threads(cfg.threads))
    check_batch_fits(cfg.batch, teacher.spec.data_shape, ex)
    teacher, prompts = teacher.family.training_conditions(teacher, cfg, sources, ex.device)
    with Run(out, RECORDING, ex, reporter) as run:
        manifest = _record(run, cfg, sources, (teacher, networks), student, prompts, force)
    manifest.session["warnings"] = warnings
    return manifest


def _record(
    run: Run,
    cfg: RecordConfig,
    sources: dict[str, str],
    placed: tuple[Teacher, Networks],
    student: DenoiserFile | None,
    prompts: PromptsRef | None,
    force: bool,
) -> TrajectoryManifest:
    """Set up (or restore) everything the recording loop needs, then run it."""
    ex, (teacher, networks) = run.ex, placed

    def changes(manifest: TrajectoryManifest) -> list[str]:
        found = (
            [] if manifest.teacher.sha256 == teacher.sha256 else ["teacher weights (sha256) differ"]
        )
        if manifest.prompts != prompts:
            found.append("prompt file (sha256) differs")
        return found

    previous = run.start_or_resume(cfg, force, changes, lambda: _refuse_if_used(run.directory))
    if run.finished(previous, cfg):
        return previous

    g0_of = previous.g0 if previous is not None else g0_spec(cfg, teacher, student)
    g0, _ = build_g0(g0_of, teacher, ex.device, cfg.verify, share=True, networks=networks)
    size = (cfg.probe_samples, probe_chunk(cfg.probe_samples, cfg.batch, ex.device))
    run.note(f"path probe: {size[0]} G0 samples through G0 and the teacher (chunks of {size[1]})")
    levels = TrainingSigma.of(cfg, teacher.denoiser)
    probe = PathProbe(teacher, g0, levels, size, ex.device, run.reporter)
    plan = previous.node_plan if previous is not None else None
    if plan is None:
        plan = node_steps(cfg.iters, cfg.nodes)[1:]
        if cfg.placement == "distance":
            plan = plan_by_distance(cfg, teacher, g0, probe, ex, run.reporter, networks)
    ex.prepare(g0.denoiser)
    node_format = teacher.family.node_format(cfg)
    state, aux = _training_state(cfg, teacher, node_format, ex, networks)
    start = previous.state.step if previous is not None and previous.state else 0
    _check_disk(run, cfg, node_format, tensor_bytes(state.modules["aux"]), plan, start)
    if previous is None:
        teacher_node = NodeRecord(
            index=0,
            step=0,
            file=None,
            sha256=teacher.sha256,
            dist_to_teacher=0,
            g0_loss=probe.teacher_loss,
        )
        stamp = now()
        manifest = TrajectoryManifest(
            created_at=stamp,
            updated_at=stamp,
            status="recording",
            teacher=teacher.reference(),
            g0=g0_of,
            prompts=prompts,
            node_plan=plan,
            config=cfg,
            nodes=[teacher_node],
            world_size=ex.world_size,
            global_batch=ex.global_batch(cfg.batch),
        )
    else:
        manifest = previous
        if manifest.state is None:  # killed before its first resume point: start over
            manifest.nodes = manifest.nodes[:1]
    step = run.begin(manifest, state, cfg, sources)
    run.note(memory_plan(cfg, g0_of, node_format, teacher, ex).describe())  # inputs all checked
    return record_path(run, cfg, teacher, g0, probe, plan, state, aux, step, node_format)


def memory_plan(cfg: RecordConfig, g0_of, node_format: NodeFormat, teacher, ex) -> MemoryPlan:
    """What each process holds: the teacher (also G0 when G0 is its copy), a student G0, and
    what the node format trains; sharded, the teacher is read whole before it is sharded (one
    process of a host at a time)."""
    g0_copies = {} if g0_of.copies_teacher else {"G0 (the student)": 1}
    return MemoryPlan(
        {"teacher": 1, **g0_copies, **node_format.recording_copies},
        4 * teacher.parameter_count,
        ex.layout.shards,
        read_whole=cfg.sharded,
    )


def _check_disk(
    run: Run, cfg: RecordConfig, node_format: NodeFormat, aux_bytes: int, plan, start: int
) -> None:
    """Say what the remaining nodes and two resume points (weights + two Adam moments each)
    take on disk, and refuse to start without that much room."""
    node_bytes = node_format.node_bytes(aux_bytes, cfg)
    remaining = sum(s > start for s in plan)
    run.reporter.note(
        f"disk: {remaining} path nodes x {node_bytes / 2**20:,.1f} MiB "
        f"({node_format.describe(cfg)}) = {remaining * node_bytes / 2**30:,.2f} GiB, and resume "
        f"points of {3 * aux_bytes / 2**30:,.2f} GiB"
    )
    run.ensure_space(
        node_bytes * remaining + aux_bytes * 2 * 3, "the remaining path nodes and resume points"
    )


def record_path(
    run: Run,
    cfg: RecordConfig,
    teacher: Teacher,
    g0,
    probe: PathProbe,
    plan: list[int],
    state: TrainingState,
    aux: nn.Module,
    start: int,
    node_format: NodeFormat,
) -> TrajectoryManifest:
    """Algorithm 1, degradation recording, from iteration `start` to `cfg.iters`, training the
    auxiliary model `aux` (whose trained parameters `state` holds)."""
    optimizer, losses = state.optimizers["aux"], state.loop["losses"]
    shape, levels = (cfg.batch, *teacher.spec.data_shape), TrainingSigma.of(cfg, teacher.denoiser)
    node_at_step = {s: i for i, s in enumerate(plan, start=1)}
    for step in run.iterations("record", start, cfg.iters, cfg.save_every):
        # Eq. (7): one denoising-score-matching step of the auxiliary model on x0 = G0(z),
        # noised to x0 + sigma n; it drifts from the teacher's distribution toward G0's.
        loss, grad_norm = denoising_step(
            aux, optimizer, g0, shape, teacher.conditions, levels, state.rng, ex=run.ex
        )
        run.check_finite(step, loss=loss, grad_norm=grad_norm)
        losses.add(run.ex.mean(loss.detach()).item())
        run.reporter.advance(step, loss=loss.item())
        # Every iters/N iterations (or as planned) it is saved as the next path node; node N
        # fits G0. A resume point follows, so a resumed recording never saves a node twice.
        if step in node_at_step:
            index = node_at_step[step]
            node = save_node(run, aux, index, step, teacher, probe, losses, cfg, node_format)
            run.manifest.nodes.append(node)
            run.request_save()
    return run.manifest


def save_node(
    run: Run,
    aux,
    index: int,
    step: int,
    teacher: Teacher,
    probe: PathProbe,
    losses: LossMeans,
    cfg: RecordConfig,
    node_format: NodeFormat,
) -> NodeRecord:
    """Path node `index`: the auxiliary model's weights or adapters, as `node_format` stores
    them (rank 0 writes them), and where it stands on the probe."""
    run.reporter.phase(f"saving path node {index}")
    file = node_file(index)
    info = {
        "role": "path_node",
        "index": index,
        "step": step,
        "dataset": teacher.dataset,
        "train_sigma": teacher.train_sigma,
        "teacher_sha256": teacher.sha256,
    }
    # Every rank takes part (a sharded network is gathered as it is written); the digest is
    # known to rank 0, which writes the manifest.
    digest = run.ex.layout.write_whole(
        aux, lambda whole: node_format.save(run.directory / file, whole, teacher, info, cfg)
    )
    distance, g0_loss = probe(aux)
    return NodeRecord(
        index=index,
        step=step,
        file=file,
        sha256=digest or "",  # known to rank 0 only
        dist_to_teacher=distance,
        g0_loss=g0_loss,
        train_loss=losses.take(),
    )


def _training_state(
    cfg: RecordConfig, teacher: Teacher, node_format: NodeFormat, ex: Execution, networks=WHOLE
) -> tuple[TrainingState, nn.Module]:
    """The auxiliary model (a trainable teacher copy, or a frozen copy with trainable adapters,
    as the node format wants; made by `networks`, whole or sharded), the state of what trains
    (weights, optimiser, random streams) exactly as at iteration 0."""
    aux = networks.copy(teacher.denoiser).train().requires_grad_(True)
    set_dropout(aux, cfg.dropout)
    trained = node_format.trained(aux, cfg)
    if cfg.gradient_checkpointing:
        enable_checkpointing(aux)
    ex.prepare(aux)
    optimizer = make_optimizer(trained.parameters(), cfg.lr, cfg.betas)
    rng = seed_streams(cfg.seed, ex)
    state = TrainingState({"aux": trained}, {"aux": optimizer}, rng, {"losses": LossMeans()})
    return state, aux


def _refuse_if_used(trajectory: Path) -> None:
    """A recording that backtrack runs were trained on is not discarded by --force."""
    runs = trajectory / BACKTRACK_FOLDER
    if runs.is_symlink() or (runs.is_dir() and any(runs.iterdir())):
        raise ConfigError(
            f"{trajectory} has backtrack runs that depend on its path; choose another --out"
        )


PLAN_CHECKS = 100  # probe distances measured while planning nodes by distance


def plan_by_distance(
    cfg: RecordConfig,
    teacher: Teacher,
    g0,
    probe: PathProbe,
    ex: Execution,
    reporter,
    networks=WHOLE,
) -> list[int]:
    """Node steps such that node i is the first checkpoint at >= i/N of the final distance from
    the teacher. A dry run of the (deterministic) recording measures the distances; the real run
    repeats it and saves at the planned steps."""
    state, aux = _training_state(cfg, teacher, teacher.family.node_format(cfg), ex, networks)
    optimizer = state.optimizers["aux"]
    shape = (cfg.batch, *teacher.spec.data_shape)
    every = max(1, cfg.iters // max(PLAN_CHECKS, 4 * cfg.nodes))
    distances: list[tuple[int, float]] = []
    reporter.start("plan nodes", cfg.iters, 0)
    for step in range(1, cfg.iters + 1):
        denoising_step(
            aux,
            optimizer,
            g0,
            shape,
            teacher.conditions,
            TrainingSigma.of(cfg, teacher.denoiser),
            state.rng,
            ex=ex,
        )
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
        if not (
            type(count) is int
            and 0 <= count <= 1 << 40
            and type(total) in (int, float)
            and math.isfinite(total)
            and total >= 0
        ):
            raise DisbackError(f"{where}: malformed loss means in the recording state")
        self.total, self.count = float(total), count
