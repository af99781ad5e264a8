"""DisBack stage 2, distribution backtracking (Algorithm 2 of the paper).

The generator starts as G0. The fake score starts at path node N (fitted to G0) and is kept
fitted to the generator by denoising score matching; the target starts at node N-1 and moves one
node toward the teacher every `interval` iterations. `no_trajectory` runs the plain distillation
baseline through the same loop: target = teacher throughout, fake score initialised as the teacher.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch

from disback_cli.config import BacktrackConfig
from disback_cli.config.resolve import resolve_backtrack
from disback_cli.errors import ConfigError
from disback_cli.evaluation.datasets import GaussianMixture, get_dataset
from disback_cli.evaluation.ground_truth import training_evaluator
from disback_cli.evaluation.mismatch import ScoreMismatch
from disback_cli.method.data import DataSource, open_data
from disback_cli.method.dsm import denoising_step
from disback_cli.method.ema import ema_beta, update_ema
from disback_cli.method.generator import build_g0
from disback_cli.method.guidance import guided
from disback_cli.method.losses import GeneratorLoss, generator_step, make_generator_loss
from disback_cli.method.noise import TrainingSigma
from disback_cli.method.ratio import ratio_step
from disback_cli.method.schedule import AdaptiveSchedule, FixedSchedule, TargetHistory
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.networks import NetworkSpec, enable_checkpointing, set_dropout
from disback_cli.models.ratio import build_ratio, ratio_spec_for, save_ratio
from disback_cli.models.teachers import Teacher
from disback_cli.models.text_to_image.sampling import sampling_info
from disback_cli.runtime.devices import peak_memory_gib
from disback_cli.runtime.parallel import check_batch_fits, cpu_threads, process_of
from disback_cli.runtime.reporting import Reporter
from disback_cli.runtime.tracking import open_trackers
from disback_cli.stages.lifecycle import (
    BACKTRACKING,
    Run,
    TrainingState,
    make_optimizer,
    seed_streams,
)
from disback_cli.stages.path_nodes import LoraPathNodes, NoTargets, PathNodes, path_nodes
from disback_cli.stages.prompts import with_training_prompts
from disback_cli.store.layout import METRICS, backtrack_dir, check_no_links, checkpoint_file
from disback_cli.store.manifests import (
    BacktrackManifest,
    DataRecord,
    FileRef,
    PromptsRef,
    TeacherRef,
    TrajectoryManifest,
    now,
    open_trajectory,
)
from disback_cli.store.metrics_log import MetricsLog
from disback_cli.store.tensorfile import tensor_bytes


def run_backtrack(
    cfg: BacktrackConfig,
    trajectory: str | Path,
    name: str = "default",
    *,
    force: bool = False,
    teacher_override: str | None = None,
    reporter: Reporter | None = None,
) -> BacktrackManifest:
    """Train (or resume, or extend) the backtrack run `name` of `trajectory`.

    Under torchrun every process calls this; rank 0 alone writes files and reports progress."""
    trajectory = Path(trajectory)
    ex, reporter = process_of(cfg, reporter)
    traj, teacher = open_trajectory(trajectory, teacher_override, ex.device, cfg.verify)
    cfg, sources = resolve_backtrack(cfg, teacher)
    torch.set_num_threads(cpu_threads(cfg.threads))
    prompts = None
    if teacher.text_to_image:
        cfg, sources, teacher, prompts = _training_prompts(cfg, sources, traj, teacher, ex.device)
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
    data = None  # diffratio's real data, checked before anything is written
    if cfg.loss == "diffratio":
        if cfg.mismatch_every:
            raise ConfigError(
                "--mismatch-every needs a target and a fake score; diffratio has neither"
            )
        data = open_data(cfg.data, teacher.spec.data_shape, teacher.spec.label_dim)
    run_dir = backtrack_dir(trajectory, name)
    check_no_links(trajectory, run_dir.relative_to(trajectory))  # before creating anything
    with Run(run_dir, BACKTRACKING, ex, reporter) as run:
        return _backtrack(run, cfg, sources, trajectory, traj, teacher, prompts, data, name, force)


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


def _training_prompts(
    cfg: BacktrackConfig, sources: dict, traj: TrajectoryManifest, teacher: Teacher, device
) -> tuple[BacktrackConfig, dict, Teacher, PromptsRef]:
    """A text-to-image run trains on --prompts, or else on the prompts its path was recorded
    with (checked by sha256)."""
    expected = None
    if cfg.prompts is None:
        if traj.prompts is None:
            raise ConfigError("a text-to-image teacher needs --prompts FILE")
        cfg = cfg.model_copy(update={"prompts": traj.prompts.file})
        sources = {**sources, "prompts": "trajectory"}
        expected = traj.prompts.sha256
    teacher, ref = with_training_prompts(teacher, cfg.prompts, device, expected)
    return cfg, sources, teacher, ref


def make_schedule(cfg: BacktrackConfig, last_node: int) -> FixedSchedule | AdaptiveSchedule:
    """Which path node is the target: always the teacher for --no-trajectory, else the rule."""
    if cfg.no_trajectory:
        return FixedSchedule(last_node=1, interval=cfg.interval)  # node 0 from the start
    if cfg.switch == "adaptive":
        return AdaptiveSchedule(last_node, cfg.switch_patience, cfg.switch_tolerance, cfg.interval)
    return FixedSchedule(last_node, cfg.interval)


def _backtrack(
    run: Run,
    cfg: BacktrackConfig,
    sources: dict[str, str],
    trajectory: Path,
    traj: TrajectoryManifest,
    teacher: Teacher,
    prompts: PromptsRef | None,
    data: DataSource | None,
    name: str,
    force: bool,
) -> BacktrackManifest:
    """Set up (or restore) everything the backtracking loop needs, then run it."""
    ex = run.ex
    path_sha = [node.sha256 for node in traj.nodes]
    data_record = None if data is None else DataRecord(**vars(data.ref))

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
        if manifest.data != data_record:
            found.append("the --data content (sha256) differs")
        return found

    previous = run.start_or_resume(cfg, force, changes)
    if run.finished(previous, cfg):
        return previous

    generator, generator_spec = build_g0(traj.g0, teacher, ex.device)
    generator.train().requires_grad_(True)
    set_dropout(generator, cfg.dropout)
    # Noise levels from the teacher's denoiser before `PathNodes` takes its weights.
    loss_fn, levels = (
        make_generator_loss(cfg, teacher.denoiser),
        TrainingSigma.of(cfg, teacher.denoiser),
    )
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    if data is None:
        targets = path_nodes(trajectory, traj, teacher, ex, cfg.verify)  # the teacher's too
        fake = targets.copy_of(0 if cfg.no_trajectory else traj.last_node)
    else:  # diffratio: a density-ratio network instead of the fake score; no target
        targets, teacher.denoiser = NoTargets(), None  # nothing queries the teacher's score
        spec = ratio_spec_for(
            teacher.spec.data_shape,
            teacher.spec.label_dim,
            generator.denoiser.sigma_data,
            cfg.ratio_width,
            cfg.ratio_depth,
        )
        fake = build_ratio(spec, seed=cfg.seed).to(ex.device)
    try:
        fake.train().requires_grad_(True)
        set_dropout(fake, cfg.dropout)
        if cfg.gradient_checkpointing:
            enable_checkpointing(generator)
            enable_checkpointing(fake)
        optimizers = {
            "generator": make_optimizer(
                generator.parameters(), cfg.lr_g, cfg.betas, cfg.optimizer, cfg.weight_decay
            ),
            "fake": make_optimizer(
                fake.parameters(), cfg.lr_fake, cfg.betas, cfg.optimizer, cfg.weight_decay
            ),
        }
        modules = {"generator": generator, "generator_ema": generator_ema, "fake": fake}
        rng = seed_streams(cfg.seed, ex)
        schedule = make_schedule(cfg, traj.last_node)
        history = TargetHistory()
        state = TrainingState(modules, optimizers, rng, {"schedule": schedule, "targets": history})
        # Room for two checkpoints (the previous one goes once the next is complete): generator,
        # EMA, and the state (generator, EMA, fake score, two Adam moments each for G and fake).
        g_size, f_size = tensor_bytes(generator), tensor_bytes(fake)
        run.ensure_space(2 * (5 * g_size + 3 * f_size), "two checkpoints")
        if previous is None:
            stamp = now()
            previous = BacktrackManifest(
                created_at=stamp,
                updated_at=stamp,
                status="running",
                name=name,
                teacher=TeacherRef.of(teacher),
                g0=traj.g0,
                prompts=prompts,
                data=data_record,
                path_sha256=path_sha,
                config=cfg,
                world_size=ex.world_size,
                global_batch=ex.global_batch(cfg.batch),
            )
        step = run.begin(previous, state, cfg, sources)
        ex.prepare(generator.denoiser)
        ex.prepare(fake)
        log = TrainingLog(run, cfg, teacher)
        try:
            save = generator_files(run, teacher, generator_spec, data is not None)
            fit = denoising_step if data is None else functools.partial(ratio_step, data=data)
            return backtrack(
                run, cfg, teacher, state, schedule, targets, (loss_fn, fit, levels), log, save, step
            )
        finally:
            log.close()
    finally:
        targets.close()


def backtrack(
    run: Run,
    cfg: BacktrackConfig,
    teacher: Teacher,
    state: TrainingState,
    schedule,
    targets: PathNodes | LoraPathNodes | NoTargets,
    losses: tuple[GeneratorLoss, Callable, TrainingSigma],
    log: TrainingLog,
    save: Callable[[int], None],
    start: int,
) -> BacktrackManifest:
    """Algorithm 2, distribution backtracking, from iteration `start` to `cfg.iters`.
    `losses`: the generator loss, the fake score's step (`dsm.denoising_step`; diffratio: the
    ratio network's `ratio.ratio_step`) and the noise levels it trains at."""
    ex, rng = run.ex, state.rng
    modules = state.modules
    generator, generator_ema, fake = modules["generator"], modules["generator_ema"], modules["fake"]
    opt_g, opt_f = state.optimizers["generator"], state.optimizers["fake"]
    loss_fn, fit_fake, levels = losses
    shape, conditions = (cfg.batch, *teacher.spec.data_shape), teacher.conditions
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
        # Eq. (8): a generator step on (fake - target) at noised generator samples, the target
        # with classifier-free guidance for text-to-image teachers. (The target is not held
        # here: at a switch the old node is freed before the next is read.)
        target = guided(targets.at(node), cfg.guidance_scale)
        out, grad_norm_g = generator_step(
            generator, opt_g, loss_fn, fake, target, shape, conditions, rng, clip, ex
        )
        # Eq. (5): the fake score's denoising step(s) keep it fitted to the current generator.
        for _ in range(cfg.fake_steps):
            loss_fake, grad_norm_fake = fit_fake(
                fake, opt_f, generator, shape, conditions, levels, rng, clip, ex
            )
        run.check_finite(
            step,
            loss_g=out.loss,
            grad_norm_g=grad_norm_g,
            loss_fake=loss_fake,
            grad_norm_fake=grad_norm_fake,
        )
        schedule.observe(ex.mean(out.score_gap))
        # The generator's EMA (EDM half-life in images) is what `sample` draws from.
        update_ema(
            generator_ema, generator, ema_beta(n, step * n, cfg.ema_halflife_kimg, cfg.ema_rampup)
        )
        log.add(
            loss_g=out.loss,
            loss_fake=loss_fake,
            score_gap=out.score_gap,
            grad_norm_g=grad_norm_g,
            grad_norm_fake=grad_norm_fake,
        )
        log.line(step, node, generator_ema, (generator, fake, target))
    return run.manifest


class TrainingLog:
    """metrics.jsonl of a run: means of the logged values over the last `log_every` iterations
    (averaged over ranks, kept on the device between lines), and with `eval_every` the
    ground-truth metrics of the EMA generator."""

    def __init__(self, run: Run, cfg: BacktrackConfig, teacher: Teacher) -> None:
        self.run, self.cfg = run, cfg
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.evaluate = None
        if cfg.eval_every and run.ex.is_main:
            self.evaluate = training_evaluator(
                teacher.dataset,
                cfg.eval_samples,
                teacher.spec.data_shape,
                teacher.conditions,
                run.ex.device,
                cfg.batch,
            )
        self.mismatch = None
        if cfg.mismatch_every and run.ex.is_main:
            self.mismatch = ScoreMismatch(get_dataset(teacher.dataset), run.ex.device)
        self.log = MetricsLog(check_no_links(run.directory, METRICS), run.ex.is_main)
        self.trackers = []
        if run.ex.is_main:
            self.trackers = open_trackers(
                cfg.log_to, run.directory, cfg.model_dump(mode="json"), run.manifest.created_at
            )

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def _means(self) -> dict[str, float]:
        keys = list(self.sums)
        values = self.run.ex.mean(torch.stack([self.sums[k] for k in keys]) / self.count)
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.tolist(), strict=True))

    def line(self, step: int, target_node: int, generator_ema, networks: tuple) -> None:
        """The log line of `step`, if one is due; `networks`: (generator, fake, target) for the
        score-mismatch diagnostics."""
        cfg, line = self.cfg, {}
        last = step == cfg.iters
        if step % cfg.log_every == 0 or last:
            line.update(target_node=target_node, **self._means(), seconds=self.run.elapsed())
            switched = self.run.state.loop["targets"].take_switch()
            if switched is not None:  # the target moved after this many iterations
                line["target_switch_at"] = switched
            peak = peak_memory_gib(self.run.ex.device)
            if peak is not None:  # this GPU's peak so far (rank 0's)
                line["peak_memory_gib"] = peak
            self.run.reporter.advance(step, loss_g=line["loss_g"], gap=line["score_gap"])
        if self.evaluate and (step % cfg.eval_every == 0 or last):
            line["eval"] = self.evaluate(generator_ema)
        if self.mismatch and (step % cfg.mismatch_every == 0 or last):
            line["mismatch"] = self.mismatch(*networks)
        if line:
            self.log.write(step, line)
            for tracker in self.trackers:
                tracker.log(step, line)

    def close(self) -> None:
        self.log.close()
        for tracker in self.trackers:
            tracker.close()


def generator_files(
    run: Run, teacher: Teacher, spec: NetworkSpec, ratio: bool = False
) -> Callable[[int], None]:
    """What a backtrack resume point writes besides the state: the generator and its EMA as
    denoiser files that `sample` reads (and diffratio's ratio network, its verifier)."""

    def write(step: int) -> None:
        manifest = run.manifest
        info = {
            "role": "generator",
            "sigma_init": manifest.g0.sigma_init,
            "step": step,
            "dataset": teacher.dataset,
            "teacher_sha256": teacher.sha256,
        }
        if manifest.g0.input_scale is not None:
            info["input_scale"] = manifest.g0.input_scale
        if teacher.text_to_image:  # the text encoders and VAE `sample` needs
            info["text_to_image"] = sampling_info(teacher.folder)
        refs = {}
        for key, weights in (("generator", "raw"), ("generator_ema", "ema")):
            file = checkpoint_file(key.replace("_", "-"), step)
            denoiser = run.state.modules[key].denoiser
            digest = save_denoiser(
                run.directory / file, denoiser, spec, {**info, "weights": weights}
            )
            refs[key] = FileRef(file=file, sha256=digest)
        manifest.generator, manifest.generator_ema = refs["generator"], refs["generator_ema"]
        if ratio:
            file = checkpoint_file("ratio", step)
            digest = save_ratio(
                run.directory / file,
                run.state.modules["fake"],
                {"role": "verifier", "step": step, **info},
            )
            manifest.ratio = FileRef(file=file, sha256=digest)
        manifest.step = step

    return write
