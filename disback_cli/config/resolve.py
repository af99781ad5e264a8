"""Settings left unset are filled from the teacher, the loss or the student, and every resolved
value keeps a note of where it came from (written into the manifest as `config_sources`).

A bare `disback backtrack` on an EDM U-Net must not inherit rates tuned for the toy ring, so the
rates and the EMA half-life default by teacher family (see `config.FAMILY_DEFAULTS`).
"""

from __future__ import annotations

import os

from disback_cli.config import FAMILY_DEFAULTS, BacktrackConfig, RecordConfig
from disback_cli.errors import ConfigError
from disback_cli.method.losses import LOSS_TRAINING_SIGMA
from disback_cli.models.denoiser_files import DenoiserFile
from disback_cli.models.networks import network_dropout
from disback_cli.models.teachers import Teacher

EDM_SIZE_PARAMETERS = 10_000_000  # the smallest released EDM teacher has 56 M
DEFAULT_SIGMA_INIT = 2.5  # SiD's init_sigma


def teacher_family(teacher: Teacher) -> str:
    """vector, image, edm (read from an EDM pickle, converted from one, or as large), or text
    (a text-to-image teacher read from a diffusers folder)."""
    if teacher.text_to_image:
        return "text"
    if len(teacher.spec.data_shape) == 1:
        return "vector"
    if "edm" in teacher.info or teacher.parameter_count >= EDM_SIZE_PARAMETERS:
        return "edm"
    return "image"


def _resolve(cfg, teacher: Teacher, update: dict, sources: dict) -> tuple:
    for key in ("p_mean", "p_std"):
        if getattr(cfg, key) is None:
            update[key], sources[key] = teacher.train_sigma[key], "teacher"
    family = teacher_family(teacher)
    if family == "text":
        _text_to_image(cfg, update, sources)
    elif cfg.prompts is not None or cfg.gradient_checkpointing:
        flag = "--prompts" if cfg.prompts is not None else "--gradient-checkpointing"
        raise ConfigError(f"{flag} is for text-to-image teachers (a diffusers model folder)")
    elif cfg.dsm_sigma == "discrete":
        raise ConfigError("--dsm-sigma discrete is for text-to-image (discrete-time) teachers")
    if cfg.dsm_sigma is None and "dsm_sigma" not in update:
        update["dsm_sigma"] = LOSS_TRAINING_SIGMA[cfg.loss]
        sources["dsm_sigma"] = f"loss {cfg.loss}"
    for key, by_family in FAMILY_DEFAULTS.items():
        if key in type(cfg).model_fields and getattr(cfg, key) is None:
            update[key], sources[key] = by_family[family], f"default for {family} teachers"
    if cfg.threads is None and family == "vector" and not os.environ.get("OMP_NUM_THREADS"):
        # benchmarks/threads.py: the ring's MLP is no faster on 2 threads than on 1 on a quiet
        # machine, and 6x slower beside a busy process; image networks do gain from more.
        update["threads"], sources["threads"] = 1, "default for vector teachers"
    for key in type(cfg).model_fields:
        sources.setdefault(key, "default")
    return cfg.model_copy(update=update), dict(sorted(sources.items()))


def _text_to_image(cfg, update: dict, sources: dict) -> None:
    """A discrete-time teacher knows only its own timesteps: its fake score and path nodes train
    at all of them, as DMD2 trains its fake score on SD."""
    if cfg.dsm_sigma not in (None, "discrete"):
        raise ConfigError(
            f"--dsm-sigma {cfg.dsm_sigma} does not apply to a text-to-image teacher, which knows "
            "only its own timesteps (discrete)"
        )
    if cfg.dsm_sigma is None:
        update["dsm_sigma"], sources["dsm_sigma"] = "discrete", "default for text teachers"


def resolve_record(
    cfg: RecordConfig, teacher: Teacher, student: DenoiserFile | None = None
) -> tuple[RecordConfig, dict[str, str]]:
    """The recording's config with nothing left unset, and where each value came from.

    Dropout defaults to the teacher's own: a different rate would make node 1 differ from the
    teacher by the dropout change alone. A student file's own sigma_init is used (the generator
    was trained with it); a different --sigma-init is refused."""
    sources, update = cfg.given_sources(), {}
    if cfg.dropout is None:
        update["dropout"], sources["dropout"] = network_dropout(teacher.denoiser), "teacher"
    own = student.info.get("sigma_init") if student is not None else None
    if own is not None and cfg.sigma_init is not None and cfg.sigma_init != own:
        raise ConfigError(
            f"--sigma-init {cfg.sigma_init:g} conflicts with the student's own sigma_init "
            f"{own:g} ({cfg.student}); leave --sigma-init out"
        )
    if own is not None:
        update["sigma_init"], sources["sigma_init"] = own, "student"
    elif teacher.text_to_image:
        _g0_timestep(cfg, teacher, update, sources)
    elif cfg.sigma_init is None:
        update["sigma_init"], sources["sigma_init"] = DEFAULT_SIGMA_INIT, "default"
    if not teacher.text_to_image and (cfg.timestep is not None or cfg.lora_rank is not None):
        flag = "--timestep" if cfg.timestep is not None else "--lora-rank"
        raise ConfigError(f"{flag} is for text-to-image teachers (a diffusers model folder)")
    if teacher.text_to_image and cfg.prompts is None:
        raise ConfigError("a text-to-image teacher needs --prompts FILE")
    return _resolve(cfg, teacher, update, sources)


def _g0_timestep(cfg: RecordConfig, teacher: Teacher, update: dict, sources: dict) -> None:
    """G0 of a text-to-image teacher maps pure noise, read as the DDPM input at a timestep, to
    x0 (DMD2): sigma_init is that timestep's sigma. An explicit --sigma-init keeps EDM's
    convention G0(z) = D(sigma_init z, sigma_init) instead."""
    if cfg.sigma_init is not None:
        if cfg.timestep is not None:
            raise ConfigError("give either --timestep or --sigma-init, not both")
        return
    sigmas = teacher.denoiser.sigmas
    timestep = cfg.timestep if cfg.timestep is not None else len(sigmas) - 1
    if timestep >= len(sigmas):
        raise ConfigError(f"--timestep {timestep}: the teacher has timesteps 0..{len(sigmas) - 1}")
    if cfg.timestep is None:
        update["timestep"], sources["timestep"] = timestep, "default for text teachers"
    update["sigma_init"], sources["sigma_init"] = float(sigmas[timestep]), "timestep"


def resolve_backtrack(cfg: BacktrackConfig, teacher: Teacher) -> tuple[BacktrackConfig, dict]:
    """The run's config with nothing left unset (but dropout: none keeps each network's own),
    and where each value came from."""
    sources, update = cfg.given_sources(), {}
    if cfg.dropout is None:
        sources["dropout"] = "each network's own"
    if teacher.text_to_image:
        if cfg.guidance_scale is None:
            update["guidance_scale"] = 8.0 if teacher.folder.xl else 1.75
            sources["guidance_scale"] = "default for text teachers (DMD2)"
    elif cfg.guidance_scale not in (None, 1.0):
        raise ConfigError("--guidance-scale is for text-to-image teachers")
    if cfg.loss == "diffratio":
        _diffratio(cfg, teacher, update, sources)
    elif cfg.data is not None or cfg.ratio_width is not None or cfg.ratio_depth is not None:
        raise ConfigError("--data, --ratio-width and --ratio-depth are for --loss diffratio")
    return _resolve(cfg, teacher, update, sources)


def _diffratio(cfg: BacktrackConfig, teacher: Teacher, update: dict, sources: dict) -> None:
    """DiffRatio learns from data, not from the teacher's score or the path: it needs --data,
    and it runs without the trajectory (its G0 still comes from it; docs/method.md says why
    the path is not used)."""
    if cfg.data is None:
        raise ConfigError(
            "--loss diffratio learns from real data: give --data (builtin:NAME, "
            "an image folder or an EDM dataset zip)"
        )
    if teacher.text_to_image:
        raise ConfigError("--loss diffratio is not available for text-to-image teachers")
    if not cfg.no_trajectory:
        update["no_trajectory"], sources["no_trajectory"] = True, "loss diffratio"
