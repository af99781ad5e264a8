"""Settings left unset are filled from the teacher, the loss or the student, and every resolved
value keeps a note of where it came from (written into the manifest as `config_sources`).

What depends on the kind of teacher is its family's to say (`models.family`): a bare `disback
backtrack` on an EDM U-Net must not inherit rates tuned for the toy ring, and a text-to-image
teacher trains at its own timesteps. What depends on the fake side (a score network, or DiffRatio's
ratio network) is the fake side's (`method.fake_sides`). Options that belong to another family or
fake side than the run's are refused, naming whom they are for.
"""

from __future__ import annotations

import os

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.errors import ConfigError
from disback_cli.method.adversarial import ADVERSARIES
from disback_cli.method.fake_sides import FAKE_SIDES, make_fake_side
from disback_cli.method.losses import LOSS_TRAINING_SIGMA
from disback_cli.models.denoiser_files import DenoiserFile
from disback_cli.models.networks import network_dropout
from disback_cli.models.teachers import TEACHER_FAMILIES, Teacher


def refuse_foreign_options(cfg, owners: list, mine: list) -> None:
    """An option only another family or fake side takes (`owner.options`: field -> the value
    that means "not used") is refused, naming what it is for."""
    taken = {field for owner in mine for field in owner.options}
    for owner in owners:
        for field, unused in owner.options.items():
            if field in taken or field not in type(cfg).model_fields:
                continue
            if getattr(cfg, field) not in (None, unused):
                flag = "--" + field.replace("_", "-")
                users = [other.description for other in owners if field in other.options]
                raise ConfigError(f"{flag} is for {' or '.join(users)}")


def _resolve(cfg, teacher: Teacher, update: dict, sources: dict, recorded=None) -> tuple:
    for key in ("p_mean", "p_std"):
        if getattr(cfg, key) is None:
            update[key], sources[key] = teacher.train_sigma[key], "teacher"
    family = teacher.family
    refuse_foreign_options(cfg, TEACHER_FAMILIES, [family])
    family.resolve(cfg, teacher, update, sources, recorded)
    if cfg.dsm_sigma is None and "dsm_sigma" not in update:
        update["dsm_sigma"] = LOSS_TRAINING_SIGMA[cfg.loss]
        sources["dsm_sigma"] = f"loss {cfg.loss}"
    for key, (value, source) in family.defaults(teacher).items():  # after the specific rules
        if key in type(cfg).model_fields and getattr(cfg, key) is None and key not in update:
            update[key], sources[key] = value, source
    vector = family.size_class(teacher) == "vector"
    if cfg.threads is None and vector and not os.environ.get("OMP_NUM_THREADS"):
        # benchmarks/threads.py: the ring's MLP is no faster on 2 threads than on 1 on a quiet
        # machine, and 6x slower beside a busy process; image networks do gain from more.
        update["threads"], sources["threads"] = 1, "default for vector teachers"
    for key in type(cfg).model_fields:
        sources.setdefault(key, "default")
    resolved = cfg.model_copy(update=update)
    if getattr(resolved, "weight_decay", None) and resolved.optimizer != "adamw":
        raise ConfigError(
            f"--weight-decay needs --optimizer adamw (the {sources['optimizer']} is "
            f"{resolved.optimizer})"
        )
    return resolved, dict(sorted(sources.items()))


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
    teacher.family.resolve_g0(cfg, teacher, own, update, sources)
    return _resolve(cfg, teacher, update, sources)


def resolve_backtrack(
    cfg: BacktrackConfig, teacher: Teacher, recorded=None
) -> tuple[BacktrackConfig, dict]:
    """The run's config with nothing left unset (but dropout: none keeps each network's own),
    and where each value came from (`recorded`: the trajectory's manifest)."""
    sources, update = cfg.given_sources(), {}
    if cfg.dropout is None:
        sources["dropout"] = "each network's own"
    fake_side = make_fake_side(cfg)
    owners = [*FAKE_SIDES.values(), *ADVERSARIES.values()]
    refuse_foreign_options(cfg, owners, [fake_side, fake_side.adversary])
    fake_side.resolve(cfg, teacher, update, sources)
    return _resolve(cfg, teacher, update, sources, recorded)
