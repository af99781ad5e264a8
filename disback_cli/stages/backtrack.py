"""DisBack stage 2, distribution backtracking (Algorithm 2 of the paper).

The generator starts as G0. The fake score starts at path node N (fitted to G0) and is kept
fitted to the generator by denoising score matching; the target starts at node N-1 and moves one
node toward the teacher every `interval` iterations. `no_trajectory` runs the plain distillation
baseline through the same loop: target = teacher throughout, fake score initialised as the teacher.
What the fake network is (a score network, or DiffRatio's ratio network) is the fake side's to
say (`method.fake_sides`); how the teacher's targets are queried, its family's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from disback_cli.config import BacktrackConfig
from disback_cli.config.resolve import resolve_backtrack
from disback_cli.errors import ConfigError
from disback_cli.evaluation.datasets import GaussianMixture, get_dataset
from disback_cli.method.ema import ema_beta, update_ema
from disback_cli.method.fake_sides import FakeSide, make_fake_side
from disback_cli.method.generator import OneStepGenerator, build_g0
from disback_cli.method.losses import GeneratorLoss, generator_step, make_generator_loss
from disback_cli.method.noise import TrainingSigma
from disback_cli.method.schedule import TargetHistory, make_schedule
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.networks import NetworkSpec, enable_checkpointing, set_dropout
from disback_cli.models.path_nodes import Targets
from disback_cli.models.teachers import Teacher, open_teacher
from disback_cli.runtime.memory_plan import MemoryPlan
from disback_cli.runtime.parallel import check_batch_fits, cpu_threads, process_of
from disback_cli.runtime.reporting import Reporter
from disback_cli.runtime.sharding import FROZEN_DTYPES, Networks, refuse_unsupported
from disback_cli.runtime.tracking import check_tracker_folders
from disback_cli.stages.lifecycle import (
    BACKTRACKING,
    Run,
    TrainingState,
    make_optimizer,
    seed_streams,
    warm_up,
)
from disback_cli.stages.training_log import TrainingLog
from disback_cli.stages.trajectory import check_node_files, completed_trajectory
from disback_cli.store.layout import backtrack_dir, check_no_links, checkpoint_file
from disback_cli.store.manifests import (
    BacktrackManifest,
    FileRef,
    PromptsRef,
    SampleRecipe,
    TrajectoryManifest,
    now,
)
from disback_cli.store.tensorfile import tensor_bytes

# The generator, its EMA and the fake network, as the loop uses them.
RunNetworks = tuple[OneStepGenerator, OneStepGenerator, nn.Module]


def run_backtrack(
    cfg: BacktrackConfig,
    trajectory: str | Path,
    name: str = "default",
    *,
    force: bool = False,
    teacher_override: str | None = None,
    reporter: Reporter | None = None,
    sample_recipe: SampleRecipe | None = None,
) -> BacktrackManifest:
    """Train (or resume, or extend) the backtrack run `name` of `trajectory`; a new run records
    `sample_recipe` (its recipe's [sample] table, for `sample -T`), a resumed one keeps its own.

    Under torchrun every process calls this; rank 0 alone writes files and reports progress."""
    trajectory = Path(trajectory)
    ex, reporter = process_of(cfg, reporter)
    traj, source = completed_trajectory(trajectory, teacher_override)
    reporter.phase(f"opening the teacher {source}")
    teacher, networks = ex.layout.place_teacher(
        lambda: open_teacher(source, ex.device, traj.teacher.sha256, recorded_in=trajectory),
        ex.device,
        FROZEN_DTYPES[cfg.frozen_dtype],
    )
    check_node_files(trajectory, traj, cfg.verify)
    cfg, sources = resolve_backtrack(cfg, teacher, traj)
    torch.set_num_threads(cpu_threads(cfg.threads))
    teacher, conditions = teacher.family.training_conditions(
        teacher, cfg, sources, ex.device, traj.prompts
    )
    check_path_noise_levels(cfg, traj, trajectory, force, reporter)
    check_batch_fits(cfg.batch, teacher.spec.data_shape, ex)
    if cfg.eval_every and teacher.dataset is None:
        raise ConfigError("--eval-every needs a teacher with a known ground-truth data set")
    if cfg.mismatch_every and not isinstance(
        get_dataset(teacher.dataset) if teacher.dataset else None, GaussianMixture
    ):
        raise ConfigError(
            "--mismatch-every needs a teacher of a Gaussian-mixture data set "
            "(builtin:ring2d), whose exact score is known"
        )
    fake_side = make_fake_side(cfg)
    check_sharding(cfg, traj, teacher, fake_side)
    fake_side.open_inputs(cfg, teacher)  # checked before anything is written
    run_dir = backtrack_dir(trajectory, name)
    check_no_links(trajectory, run_dir.relative_to(trajectory))  # before creating anything
    check_tracker_folders(cfg.log_to, run_dir)
    with Run(run_dir, BACKTRACKING, ex, reporter) as run:
        return _backtrack(
            run,
            cfg,
            sources,
            (trajectory, traj),
            (teacher, networks),
            conditions,
            fake_side,
            {"name": name, "sample_recipe": sample_recipe},
            force,
        )


def check_path_noise_levels(
    cfg: BacktrackConfig, traj: TrajectoryManifest, trajectory: Path, force: bool, reporter
) -> None:
    """The path nodes become targets, so they must have learned to denoise where this run's loss
    and fake score look: a path recorded at other noise levels is refused unless --force."""
    recorded = traj.config.dsm_sigma or "lognormal"  # recordings before 0.13 were log-normal
    if cfg.no_trajectory or recorded == cfg.dsm_sigma:
        return
    message = (
        f"{trajectory} was recorded at {recorded} noise levels, this run trains at "
        f"{cfg.dsm_sigma} ones (loss {cfg.loss})"
    )
    if not force:
        raise ConfigError(
            f"{message}: record the path with --loss {cfg.loss}, or pass --dsm-sigma {recorded} "
            "(or --force to use it as it is)"
        )
    reporter.note(f"--force: {message}")


def check_sharding(cfg: BacktrackConfig, traj: TrajectoryManifest, teacher, fake_side) -> None:
    """What sharded networks (--parallel fsdp|hsdp) need and do not cover yet: rank 0 alone
    evaluates during training, and DiffRatio's and LoRA paths' networks are whole."""
    if FROZEN_DTYPES[cfg.frozen_dtype] != torch.float32 and not cfg.sharded:
        raise ConfigError(
            f"--frozen-dtype {cfg.frozen_dtype} holds the teacher and targets as sharded "
            "networks: it needs --parallel fsdp|hsdp"
        )
    refuse_unsupported(
        cfg,
        [
            (not fake_side.shardable, fake_side.description),
            (not teacher.family.node_format(traj.config).shardable, "a path of LoRA adapters"),
            (bool(cfg.eval_every), "--eval-every (evaluate the run's files afterwards)"),
            (bool(cfg.mismatch_every), "--mismatch-every"),
            (bool(cfg.lora_rank), "--lora-rank (adapters train on one GPU's whole networks)"),
        ],
    )


def memory_plan(cfg, traj: TrajectoryManifest, teacher, fake_side: FakeSide, ex) -> MemoryPlan:
    """What each process holds: generator, gradient, Adam moments and EMA, and the fake side's
    networks and targets; sharded, the teacher is read whole before it is sharded (one process
    of a host at a time, at the start and when it becomes the target)."""
    weights = teacher.family.trained_weights(cfg)
    node_format = teacher.family.node_format(traj.config)
    resident = dict(fake_side.resident_copies(node_format, weights))
    frozen = FROZEN_DTYPES[cfg.frozen_dtype]
    if frozen != torch.float32:  # the targets held in a narrower type
        for what in [what for what in resident if what in node_format.target_copies]:
            resident[f"{what} ({cfg.frozen_dtype})"] = resident.pop(what) * frozen.itemsize / 4
    return MemoryPlan(
        {**weights.generator_copies, **resident},
        4 * teacher.parameter_count,
        ex.layout.shards,
        read_whole=cfg.sharded,
    )


def _backtrack(
    run: Run,
    cfg: BacktrackConfig,
    sources: dict[str, str],
    recorded: tuple[Path, TrajectoryManifest],
    placed: tuple[Teacher, Networks],
    prompts: PromptsRef | None,
    fake_side: FakeSide,
    named: dict[str, object],  # the new manifest's name and sample_recipe
    force: bool,
) -> BacktrackManifest:
    """Set up (or restore) everything the backtracking loop needs, then run it."""
    ex, traj, teacher = run.ex, recorded[1], placed[0]
    path_sha = [node.sha256 for node in traj.nodes]
    data = fake_side.data_record

    def changes(manifest: BacktrackManifest) -> list[str]:
        found = []
        if cfg.iters < manifest.step:
            found.append(
                f"iters: {manifest.config.iters} -> {cfg.iters} (already at {manifest.step})"
            )
        if manifest.path_sha256 != path_sha:
            found.append("the trajectory's path nodes were re-recorded")
        if manifest.prompts != prompts:
            found.append("prompt file (sha256) differs")
        if manifest.data != data:
            found.append("the --data content (sha256) differs")
        return found

    previous = run.start_or_resume(cfg, force, changes)
    if run.finished(previous, cfg):
        return previous

    # Noise levels from the teacher's denoiser before the targets take its weights.
    loss_fn = make_generator_loss(cfg, teacher.family.query_levels(teacher))
    loss_fn = fake_side.generator_loss(loss_fn)  # with the adversary's term, if any
    levels = TrainingSigma.of(cfg, teacher.denoiser)
    plan = memory_plan(cfg, traj, teacher, fake_side, ex)
    networks, generator_spec, trained, targets = build_networks(
        cfg, recorded, placed, fake_side, ex
    )
    generator, _, fake = networks
    try:
        state = _training_state(cfg, traj, generator, fake, trained, ex, fake_side)
        # Room for two checkpoints (the previous one goes once the next is complete): the
        # generator and EMA files, and the state (what trains, the EMA, two Adam moments).
        moments = 2 * (tensor_bytes(trained["generator"]) + tensor_bytes(trained["fake"]))
        state_size = sum(map(tensor_bytes, trained.values())) + moments
        run.ensure_space(2 * (2 * tensor_bytes(generator) + state_size), "two checkpoints")
        if previous is None:
            stamp = now()
            previous = BacktrackManifest(
                created_at=stamp,
                updated_at=stamp,
                status="running",
                **named,
                teacher=teacher.reference(),
                g0=traj.g0,
                prompts=prompts,
                data=data,
                path_sha256=path_sha,
                config=cfg,
                world_size=ex.world_size,
                global_batch=ex.global_batch(cfg.batch),
            )
        step = run.begin(previous, state, cfg, sources)
        ex.prepare(generator.denoiser)
        ex.prepare(fake)
        log = TrainingLog(run, cfg, teacher)
        run.note(plan.describe())  # said once every input (and tracker) has been checked
        try:
            log.first(step, networks[1])  # --eval-every: G0 measured at iteration 0
            save = generator_files(run, teacher, generator_spec, fake_side, networks)
            losses = (loss_fn, fake_side.step, levels, fake_side.adversary)
            return backtrack(run, cfg, teacher, state, networks, targets, losses, log, save, step)
        finally:
            log.close()
    finally:
        targets.close()


def build_networks(
    cfg: BacktrackConfig,
    recorded: tuple[Path, TrajectoryManifest],
    placed: tuple[Teacher, Networks],
    fake_side: FakeSide,
    ex,
):
    """The generator (G0), its EMA and the fake network; what of them trains and is saved
    (every weight, or --lora-rank adapters); and the targets. Whole copies, or (--parallel
    fsdp|hsdp) sharded ones made from the sharded teacher (or from their files) without a whole
    copy."""
    trajectory, traj = recorded
    teacher, networks = placed
    weights = teacher.family.trained_weights(cfg)
    generator, spec = build_g0(traj.g0, teacher, ex.device, cfg.verify, networks=networks)
    generator.train().requires_grad_(True)
    set_dropout(generator, cfg.dropout)
    trained = {"generator": weights.trained(generator, cfg.seed)}
    generator_ema = weights.ema_of(generator, networks.copy)
    generator_ema.eval().requires_grad_(False)
    trained["generator_ema"] = weights.kept(generator_ema)
    fake, targets = fake_side.build(cfg, trajectory, traj, teacher, generator, ex, networks)
    fake.train().requires_grad_(True)
    set_dropout(fake, cfg.dropout)
    # The fake network (score or ratio) keeps the state file's "fake" slot.
    trained["fake"] = weights.trained(fake, cfg.seed + 1) if fake_side.adapted else fake
    trained["fake"] = fake_side.attach(fake, trained["fake"], cfg, ex)  # an adversary's head
    return (generator, generator_ema, fake), spec, trained, targets


def _training_state(
    cfg: BacktrackConfig, traj: TrajectoryManifest, generator, fake, trained, ex, fake_side
) -> TrainingState:
    """What trains (`trained`: the generator's and fake network's weights or adapters, and an
    adversary's head), its optimisers (the fake network's at its fake side's rate), the random
    streams and the switching rule, exactly as at iteration 0."""
    if cfg.gradient_checkpointing:
        enable_checkpointing(generator)
        enable_checkpointing(fake)
    fake_rate = fake_side.learning_rate(cfg)
    fake_groups = fake_side.adversary.groups(trained["fake"], fake_rate, cfg)
    optimizers = {
        "generator": make_optimizer(
            trained["generator"].parameters(), cfg.lr_g, cfg.betas, cfg.optimizer, cfg.weight_decay
        ),
        "fake": make_optimizer(fake_groups, fake_rate, cfg.betas, cfg.optimizer, cfg.weight_decay),
    }
    rng = seed_streams(cfg.seed, ex)
    loop = {"schedule": make_schedule(cfg, traj.last_node), "targets": TargetHistory()}
    return TrainingState(trained, optimizers, rng, loop)


def backtrack(
    run: Run,
    cfg: BacktrackConfig,
    teacher: Teacher,
    state: TrainingState,
    networks: RunNetworks,
    targets: Targets,
    losses: tuple[GeneratorLoss, Callable, TrainingSigma],
    log: TrainingLog,
    save: Callable[[int], None],
    start: int,
) -> BacktrackManifest:
    """Algorithm 2, distribution backtracking, from iteration `start` to `cfg.iters`.
    `losses`: the generator loss, the fake network's step (`fake_sides`), the noise levels it
    trains at and the fake side's adversary; `networks`: the generator, its EMA and the fake
    network, of which `state` keeps what trains."""
    ex, rng, schedule = run.ex, state.rng, state.loop["schedule"]
    generator, generator_ema, fake = networks
    opt_g, opt_f = state.optimizers["generator"], state.optimizers["fake"]
    loss_fn, fit_fake, levels, adversary = losses
    shape, conditions = (cfg.batch, *teacher.spec.data_shape), teacher.conditions
    # The fake score as the loss queries it and as it trains: unguided, unless guided as
    # SiD-LSG guides it (--fake-guidance-scale, families with guidance).
    fake_seen = teacher.family.target(fake, cfg.fake_guidance_scale)
    n, clip = ex.global_batch(cfg.batch), cfg.grad_clip or math.inf
    for step in run.iterations(
        f"backtrack {run.directory.name}",
        start,
        cfg.iters,
        cfg.save_every,
        stop_every=cfg.log_every,
        outputs=save,
    ):
        # The target walks the path back: node N-1, then one node closer to the teacher per
        # switch (every --interval iterations, or when the score gap plateaus), then node 0.
        node = schedule.target(step - 1)
        state.loop["targets"].used(step - 1, node)
        warm_up(state.optimizers.values(), step, cfg.warmup)
        adversary.seed_step(step)  # its draws: a stream of (seed, iteration) of its own
        # Eq. (8): a generator step on (fake - target) at noised generator samples, the target
        # as the teacher's family queries it (guided, for text-to-image teachers). (The target
        # is not held here: at a switch the old node is freed before the next is read.)
        target = teacher.family.target(targets.at(node), cfg.guidance_scale)
        out, grad_norm_g = generator_step(
            generator, opt_g, loss_fn, fake_seen, target, shape, conditions, rng, clip, ex
        )
        # Eq. (5): the fake network's step(s) keep it fitted to the current generator.
        for _ in range(cfg.fake_steps):
            loss_fake, grad_norm_fake = fit_fake(
                fake_seen, opt_f, generator, shape, conditions, levels, rng, clip, ex
            )
        run.check_finite(
            step,
            loss_g=out.loss,
            grad_norm_g=grad_norm_g,
            loss_fake=loss_fake,
            grad_norm_fake=grad_norm_fake,
        )
        schedule.observe(ex.mean(out.score_gap))
        ex.layout.settle(generator)  # sharded runs: its samples for the fake step left it whole
        # The generator's EMA (EDM half-life in images) is what `sample` draws from.
        update_ema(  # of what trains (weights or adapters)
            state.modules["generator_ema"],
            state.modules["generator"],
            ema_beta(n, step * n, cfg.ema_halflife_kimg, cfg.ema_rampup),
        )
        log.add(
            loss_g=out.loss,
            loss_fake=loss_fake,
            score_gap=out.score_gap,
            grad_norm_g=grad_norm_g,
            grad_norm_fake=grad_norm_fake,
            **adversary.logged(),
        )
        log.line(step, node, generator_ema, (generator, fake, target))
    return run.manifest


def generator_files(
    run: Run,
    teacher: Teacher,
    spec: NetworkSpec,
    fake_side: FakeSide,
    networks: RunNetworks,
) -> Callable[[int], None]:
    """What a backtrack resume point writes besides the state (rank 0 writes; a sharded
    generator is gathered whole, one network at a time): the generator and its EMA as denoiser
    files that `sample` reads (with what the teacher's family needs to sample them),
    and the fake side's own files (DiffRatio: its ratio network, the verifier). Adapters
    (--lora-rank) are merged into plain weights."""
    weights = teacher.family.trained_weights(run.manifest.config)

    def write(step: int) -> None:
        """Called on every rank: a sharded network is gathered (one at a time) for rank 0."""
        manifest, ex = run.manifest, run.ex
        info = {
            "role": "generator",
            "sigma_init": manifest.g0.sigma_init,
            "step": step,
            "dataset": teacher.dataset,
            "teacher_sha256": teacher.sha256,
        }
        if manifest.g0.input_scale is not None:
            info["input_scale"] = manifest.g0.input_scale
        info.update(teacher.family.generator_info(teacher))
        refs = {}
        for key, network, kind in (
            ("generator", networks[0], "raw"),
            ("generator_ema", networks[1], "ema"),
        ):
            file = checkpoint_file(key.replace("_", "-"), step)
            digest = ex.layout.write_whole(  # all ranks take part
                weights.plain(network.denoiser),
                lambda whole, file=file, kind=kind: save_denoiser(
                    run.directory / file, whole, spec, {**info, "weights": kind}
                ),
            )
            if ex.is_main:
                refs[key] = FileRef(file=file, sha256=digest)
        side_files = fake_side.save(run.directory, step, networks[2], info, ex)  # all ranks
        if not ex.is_main:
            return
        manifest.generator, manifest.generator_ema = refs["generator"], refs["generator_ema"]
        for kind, ref in side_files.items():
            setattr(manifest, kind, ref)
        manifest.step = step

    return write
