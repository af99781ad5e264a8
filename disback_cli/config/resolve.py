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
    """vector, image, or edm (read from an EDM pickle, converted from one, or as large)."""
    if len(teacher.spec.data_shape) == 1:
        return "vector"
    if "edm" in teacher.info or teacher.parameter_count >= EDM_SIZE_PARAMETERS:
        return "edm"
    return "image"


def _resolve(cfg, teacher: Teacher, update: dict, sources: dict) -> tuple:
    for key in ("p_mean", "p_std"):
        if getattr(cfg, key) is None:
            update[key], sources[key] = teacher.train_sigma[key], "teacher"
    if cfg.dsm_sigma is None:
        update["dsm_sigma"] = LOSS_TRAINING_SIGMA[cfg.loss]
        sources["dsm_sigma"] = f"loss {cfg.loss}"
    family = teacher_family(teacher)
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
    elif cfg.sigma_init is None:
        update["sigma_init"], sources["sigma_init"] = DEFAULT_SIGMA_INIT, "default"
    return _resolve(cfg, teacher, update, sources)


def resolve_backtrack(cfg: BacktrackConfig, teacher: Teacher) -> tuple[BacktrackConfig, dict]:
    """The run's config with nothing left unset (but dropout: none keeps each network's own),
    and where each value came from."""
    sources = cfg.given_sources()
    if cfg.dropout is None:
        sources["dropout"] = "each network's own"
    return _resolve(cfg, teacher, {}, sources)
