"""DisBack stage 2, distribution backtracking.

The generator starts as G0. The fake score starts at path node N (fitted to G0) and is kept
fitted to the generator by denoising score matching; the target starts at node N-1 and moves one
node toward the teacher every `interval` iterations. `no_trajectory` runs the plain distillation
baseline through the same loop: target = teacher throughout, fake score initialised as the teacher.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path

import torch

from disback_cli.config import BacktrackConfig
from disback_cli.config.resolve import resolve_backtrack
from disback_cli.errors import ConfigError, InterruptedRun
from disback_cli.evaluation.ground_truth import training_evaluator
from disback_cli.method.dsm import clip_gradients, denoising_step
from disback_cli.method.ema import ema_beta, update_ema
from disback_cli.method.generator import build_g0
from disback_cli.method.losses import make_generator_loss
from disback_cli.method.noise import TrainingSigma
from disback_cli.method.sampling import draw_labels
from disback_cli.method.schedule import AdaptiveSchedule, FixedSchedule
from disback_cli.models.denoiser_files import save_denoiser
from disback_cli.models.networks import eval_mode, set_dropout
from disback_cli.models.teachers import Teacher
from disback_cli.runtime.parallel import Execution, check_batch_fits, execution
from disback_cli.runtime.reporting import Reporter, SilentReporter
from disback_cli.runtime.signals import stop_on_signals
from disback_cli.stages.lifecycle import check_finite
from disback_cli.stages.path_nodes import PathNodes
from disback_cli.stages.record import config_changes, teacher_ref
from disback_cli.store.fileio import ensure_free_space
from disback_cli.store.layout import (
    BACKTRACK,
    MANIFEST,
    METRICS,
    backtrack_dir,
    check_no_links,
    checkpoint_file,
    refuse_foreign,
    remove_ours,
)
from disback_cli.store.lock import run_lock
from disback_cli.store.manifests import (
    BacktrackManifest,
    FileRef,
    StateRef,
    TrajectoryManifest,
    now,
    open_trajectory,
    read_manifest,
    write_manifest,
)
from disback_cli.store.metrics_log import _truncate_metrics
from disback_cli.store.statefile import load_state, local_rng_state, save_state
from disback_cli.store.tensorfile import tensor_bytes


def _existing_run(
    run_dir: Path,
    cfg: BacktrackConfig,
    path_sha: list[str],
    ex: Execution,
    force: bool,
    reporter: Reporter,
) -> BacktrackManifest | None:
    """The run to continue, or None to start fresh. A run may be extended to more iterations.

    A fresh run needs a directory of its own; a resumed one only files disback wrote in its
    sub-folder. Files disback did not write are never deleted: the run is refused instead."""
    if not (run_dir / MANIFEST).exists() and not (run_dir / MANIFEST).is_symlink():
        refuse_foreign(run_dir, BACKTRACK, whole=True)
        ex.barrier()  # every rank has looked before rank 0 removes anything
        for path in remove_ours(run_dir, BACKTRACK) if ex.is_main else []:
            reporter.note(f"removed {path} (left by a run killed before it started)")
        return None
    manifest = read_manifest(run_dir, BacktrackManifest)
    refuse_foreign(run_dir, BACKTRACK, whole=False)
    old, new = manifest.config.identity(), cfg.identity()
    changes = config_changes({**old, "iters": None}, {**new, "iters": None})
    if cfg.iters < manifest.step:
        changes.append(
            f"iters: {manifest.config.iters} -> {cfg.iters} (already at {manifest.step})"
        )
    if manifest.path_sha256 != path_sha:
        changes.append("the trajectory's path nodes were re-recorded")
    if manifest.world_size != ex.world_size:
        changes.append(f"processes: {manifest.world_size} -> {ex.world_size} (global batch)")
    if not changes:
        return manifest
    if not force:
        raise ConfigError(
            f"{run_dir} was trained with another configuration ({'; '.join(changes)}); "
            "pass --force to train it again from scratch, or choose another --name"
        )
    reporter.note(f"--force: discarding the previous run in {run_dir}")
    ex.barrier()  # every rank has read the old manifest
    if ex.is_main:
        remove_ours(run_dir, BACKTRACK)  # the manifest first, then the log and checkpoints
    return None


class _Window:
    """Running means of logged quantities between two log lines, kept on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1

    def means(self, ex: Execution) -> dict[str, float]:
        """Means since the last call, averaged over the ranks of a data-parallel run."""
        keys = list(self.sums)
        values = ex.mean(torch.stack([self.sums[k] for k in keys]) / self.count).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, values, strict=True))


def make_schedule(cfg: BacktrackConfig, last_node: int) -> FixedSchedule | AdaptiveSchedule:
    """Which path node is the target: always the teacher for --no-trajectory, else the rule."""
    if cfg.no_trajectory:
        return FixedSchedule(last_node=1, interval=cfg.interval)  # node 0 from the start
    if cfg.switch == "adaptive":
        return AdaptiveSchedule(last_node, cfg.switch_patience, cfg.switch_tolerance, cfg.interval)
    return FixedSchedule(last_node, cfg.interval)


def make_optimizer(cfg: BacktrackConfig, params, lr: float) -> torch.optim.Optimizer:
    # foreach: one fused update over all tensors (the default on CUDA; on the CPU it saves
    # the per-tensor Python loop)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                 foreach=True)  # fmt: skip
    return torch.optim.Adam(params, lr=lr, betas=cfg.betas, foreach=True)


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
    ex = execution(cfg)
    reporter = (reporter or SilentReporter()) if ex.is_main else SilentReporter()
    traj, teacher = open_trajectory(trajectory, teacher_override, ex.device, cfg.verify)
    cfg, sources = resolve_backtrack(cfg, teacher)
    check_path_noise_levels(cfg, traj, trajectory, force, reporter)
    check_batch_fits(cfg.batch, teacher.spec.data_shape, ex)
    if cfg.eval_every and teacher.dataset is None:
        raise ConfigError("--eval-every needs a teacher with a known ground-truth data set")
    run_dir = backtrack_dir(trajectory, name)
    check_no_links(trajectory, run_dir.relative_to(trajectory))  # before creating anything
    lock = run_lock(run_dir, "backtrack", reporter) if ex.is_main else contextlib.nullcontext()
    with lock:
        return _backtrack(cfg, sources, trajectory, traj, teacher, run_dir, name, ex, force,
                          reporter)  # fmt: skip


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


def _backtrack(
    cfg: BacktrackConfig,
    sources: dict[str, str],
    trajectory: Path,
    traj: TrajectoryManifest,
    teacher: Teacher,
    run_dir: Path,
    name: str,
    ex: Execution,
    force: bool,
    reporter: Reporter,
) -> BacktrackManifest:
    path_sha = [node.sha256 for node in traj.nodes]
    manifest = _existing_run(run_dir, cfg, path_sha, ex, force, reporter)
    if manifest is not None and manifest.status == "complete" and manifest.step == cfg.iters:
        reporter.note(f"{run_dir}: already complete, nothing to do")
        return manifest

    device = ex.device
    last_node = traj.last_node
    generator, generator_spec = build_g0(traj.generator_init, teacher, device)
    generator.train().requires_grad_(True)
    set_dropout(generator, cfg.dropout)
    generator_ema = copy.deepcopy(generator).eval().requires_grad_(False)
    nodes = PathNodes(trajectory, traj, teacher, ex, cfg.verify)  # holds the teacher's weights
    fake = copy.deepcopy(nodes.load(0 if cfg.no_trajectory else last_node))
    fake.train().requires_grad_(True)
    set_dropout(fake, cfg.dropout)
    opt_g = make_optimizer(cfg, generator.parameters(), cfg.lr_g)
    opt_f = make_optimizer(cfg, fake.parameters(), cfg.lr_fake)
    rng = torch.Generator(device).manual_seed(cfg.seed)  # the same stream on every rank
    torch.manual_seed(ex.rank_seed(cfg.seed))  # dropout: one stream per rank, saved with the state
    modules = {"generator": generator, "generator_ema": generator_ema, "fake": fake}
    optimizers = {"generator": opt_g, "fake": opt_f}

    schedule = make_schedule(cfg, last_node)
    # Room for two checkpoints (the previous one goes once the next is complete): generator,
    # EMA, and the state (generator, EMA, fake score, two Adam moments each for G and fake).
    g_size, f_size = tensor_bytes(generator), tensor_bytes(fake)
    if ex.is_main:
        ensure_free_space(run_dir, 2 * (5 * g_size + 3 * f_size), "two checkpoints")
    step = 0
    if manifest is None:
        stamp = now()
        manifest = BacktrackManifest(
            created_at=stamp, updated_at=stamp, status="running", name=name,
            teacher=teacher_ref(teacher), generator_init=traj.generator_init,
            path_sha256=path_sha, config=cfg, world_size=ex.world_size,
            global_batch=ex.global_batch(cfg.batch),
        )  # fmt: skip
        if ex.is_main:
            write_manifest(run_dir, manifest)
    else:
        if manifest.state is not None:
            step, ref = manifest.state.step, manifest.state
            extra = load_state(check_no_links(run_dir, ref.file), ref.sha256, step, modules,
                               optimizers, rng, cfg.verify, ex.rank)  # fmt: skip
            schedule.load_state_dict(extra.get("schedule", {}), f"{run_dir / ref.file}")
            reporter.note(f"resuming {run_dir} from iteration {step}")
        if ex.is_main:
            _truncate_metrics(run_dir / manifest.metrics, step)
            refs = (manifest.generator, manifest.generator_ema, manifest.state)
            keep = {MANIFEST, METRICS} | {r.file for r in refs if r}
            for path in remove_ours(run_dir, BACKTRACK, keep):
                reporter.note(f"removed {path} (written after the last checkpoint)")
        manifest.status = "running"
    manifest.config, manifest.config_sources = cfg, sources
    ex.prepare(generator.denoiser)
    ex.prepare(fake)

    try:
        return _train(cfg, manifest, run_dir, name, teacher, generator_spec, nodes, modules,
                      optimizers, schedule, rng, step, ex, reporter)  # fmt: skip
    finally:
        nodes.close()


def _train(
    cfg, manifest, run_dir, name, teacher, generator_spec, nodes, modules, optimizers, schedule,
    rng, step, ex, reporter,
) -> BacktrackManifest:  # fmt: skip
    """The backtracking loop from `step` to `cfg.iters`, with saves, logs and stops."""
    generator, generator_ema, fake = (modules[k] for k in ("generator", "generator_ema", "fake"))
    opt_g, opt_f = optimizers["generator"], optimizers["fake"]
    device, label_dim = ex.device, teacher.spec.label_dim
    loss_fn, levels = make_generator_loss(cfg), TrainingSigma.of(cfg)
    evaluate = None
    if cfg.eval_every and ex.is_main:
        evaluate = training_evaluator(teacher.dataset, cfg.eval_samples, teacher.spec.data_shape,
                                      label_dim, device, cfg.batch)  # fmt: skip
    shape = (cfg.batch, *teacher.spec.data_shape)
    n = ex.global_batch(cfg.batch)
    global_shape = (n, *teacher.spec.data_shape)
    clip = cfg.grad_clip or math.inf
    window = _Window()
    target_index, target = -1, None
    started, elapsed_before = time.perf_counter(), manifest.elapsed_seconds
    metrics_path = check_no_links(run_dir, METRICS)
    metrics_file = open(metrics_path, "a") if ex.is_main else None  # noqa: SIM115
    try:
        with stop_on_signals() as stop:
            reporter.start(f"backtrack {name}", cfg.iters, step)
            while step < cfg.iters:
                wanted = schedule.target(step)
                if wanted != target_index:
                    target_index, target = wanted, None  # free the old target first
                    target = nodes.target(wanted)

                # Generator step on (fake - target) at noised generator samples. Random numbers
                # are drawn for the global batch; each rank keeps its slice.
                z = ex.local(torch.randn(global_shape, generator=rng, device=device))
                labels = ex.local(draw_labels(n, label_dim, rng, device))
                # The fake score runs without dropout here, as the targets do (SiD's choice): at
                # fake = target their difference is then exactly zero, not dropout noise.
                with ex.autocast():
                    x = generator(ex.to_input(z), labels)
                    sigma = ex.local(loss_fn.sample_sigma(n, rng, device))
                    noise = ex.local(torch.randn(global_shape, generator=rng, device=device))
                    with eval_mode(fake):
                        out = loss_fn(x, sigma, ex.to_input(noise), fake, target, labels)
                opt_g.zero_grad(set_to_none=True)
                out.loss.backward()
                ex.average_gradients(generator.parameters())
                grad_norm_g = clip_gradients(generator.parameters(), clip)
                opt_g.step()

                # Keep the fake score fitted to the current generator.
                for _ in range(cfg.fake_steps):
                    loss_fake, grad_norm_fake = denoising_step(
                        fake, opt_f, generator, shape, label_dim, levels, rng, clip, ex
                    )

                step += 1
                check_finite(step, run_dir, manifest.state, ex.any, loss_g=out.loss,
                             grad_norm_g=grad_norm_g, loss_fake=loss_fake,
                             grad_norm_fake=grad_norm_fake)  # fmt: skip
                schedule.observe(ex.mean(out.score_gap))
                beta = ema_beta(n, step * n, cfg.ema_halflife_kimg, cfg.ema_rampup)
                update_ema(generator_ema, generator, beta)
                window.add(loss_g=out.loss, loss_fake=loss_fake, score_gap=out.score_gap,
                           grad_norm_g=grad_norm_g, grad_norm_fake=grad_norm_fake)  # fmt: skip

                line: dict = {}
                if step % cfg.log_every == 0 or step == cfg.iters:
                    seconds = elapsed_before + time.perf_counter() - started
                    line.update(target_node=target_index, **window.means(ex), seconds=seconds)
                    reporter.advance(step, loss_g=line["loss_g"], gap=line["score_gap"])
                if evaluate and (step % cfg.eval_every == 0 or step == cfg.iters):
                    line["eval"] = evaluate(generator_ema)
                if line and metrics_file is not None:
                    metrics_file.write(json.dumps({"iteration": step, **line}) + "\n")
                    metrics_file.flush()
                # Stops wait for a log boundary, so a resumed log equals an uninterrupted one;
                # all ranks agree on them.
                periodic = cfg.save_every and step % cfg.save_every == 0
                stopping = step % cfg.log_every == 0 and ex.any(stop.requested)
                if periodic or stopping or step == cfg.iters:
                    manifest.elapsed_seconds = elapsed_before + time.perf_counter() - started
                    manifest.status = "complete" if step == cfg.iters else "running"
                    extra = {"schedule": schedule.state_dict()}
                    rank_rng = ex.gather(local_rng_state(device))
                    if ex.is_main:
                        metrics_file.flush()
                        _save_checkpoint(
                            run_dir, manifest, step, teacher, generator_spec, modules, optimizers,
                            rng, extra, rank_rng,
                        )  # fmt: skip
                    if stopping and step < cfg.iters:
                        raise InterruptedRun(
                            f"{stop.signal_name or 'a stop request'} at iteration {step}: state "
                            f"saved in {run_dir}; run the same command again to resume"
                        )
    finally:
        if metrics_file is not None:
            metrics_file.close()
    return manifest


def _save_checkpoint(
    run_dir, manifest, step, teacher, generator_spec, modules, optimizers, rng, extra, rank_rng
) -> None:
    """Generator, EMA and training state for `step`; the manifest moves to them last."""
    previous = [manifest.generator, manifest.generator_ema, manifest.state]
    info = {
        "role": "generator",
        "sigma_init": manifest.generator_init.sigma_init,
        "step": step,
        "dataset": teacher.dataset,
        "teacher_sha256": teacher.sha256,
    }
    refs = {}
    for key, module_name in (("generator", "generator"), ("generator_ema", "generator_ema")):
        file = checkpoint_file(key.replace("_", "-"), step)
        weights = "ema" if key == "generator_ema" else "raw"
        digest = save_denoiser(
            run_dir / file,
            modules[module_name].denoiser,
            generator_spec,
            {**info, "weights": weights},
        )
        refs[key] = FileRef(file=file, sha256=digest)
    state_file = checkpoint_file("state", step)
    state_sha = save_state(run_dir / state_file, step, modules, optimizers, rng, extra, rank_rng)
    manifest.generator, manifest.generator_ema = refs["generator"], refs["generator_ema"]
    manifest.state = StateRef(file=state_file, sha256=state_sha, step=step)
    manifest.step = step
    write_manifest(run_dir, manifest)
    current = {manifest.generator.file, manifest.generator_ema.file, state_file}
    for ref in previous:
        if ref is not None and ref.file not in current:
            (run_dir / ref.file).unlink(missing_ok=True)
