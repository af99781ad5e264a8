"""Config resolution one rule at a time (`config/resolve.py`): where each unset value comes from
and what its source says, what a given value keeps, and which options another family or fake
side owns. Whole runs recording their sources are in test_resolved_config.py."""

from __future__ import annotations

import pytest

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.config.resolve import refuse_foreign_options, resolve_backtrack, resolve_record
from disback_cli.errors import ConfigError
from disback_cli.method.fake_sides import FAKE_SIDES, ScoreFake
from disback_cli.models.networks import set_dropout
from disback_cli.models.teachers import open_teacher


@pytest.fixture(scope="module")
def ring():
    return open_teacher("builtin:ring2d")


@pytest.fixture(scope="module")
def digits():
    return open_teacher("builtin:digits")


def test_unset_backtrack_values_come_from_the_teacher_the_loss_and_the_family(ring, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg, sources = resolve_backtrack(BacktrackConfig(loss="dmd"), ring)
    assert (cfg.p_mean, cfg.p_std) == (ring.train_sigma["p_mean"], ring.train_sigma["p_std"])
    assert sources["p_mean"] == sources["p_std"] == "teacher"
    assert (cfg.dsm_sigma, sources["dsm_sigma"]) == ("karras", "loss dmd")
    for key, (value, source) in ring.family.defaults(ring).items():
        if key in BacktrackConfig.model_fields:
            assert (getattr(cfg, key), sources[key]) == (value, source)
    assert (cfg.threads, sources["threads"]) == (1, "default for vector teachers")
    # SiD's optimiser and one fake-score step, as before these were set by teacher
    assert (cfg.fake_steps, cfg.optimizer, cfg.betas, cfg.weight_decay) == (
        1,
        "adam",
        (0.0, 0.999),
        0.0,
    )
    assert sources["dropout"] == "each network's own" and cfg.dropout is None
    assert set(sources) == set(BacktrackConfig.model_fields) and list(sources) == sorted(sources)
    assert sources["iters"] == "default"


def test_given_values_are_kept_with_their_source(ring, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    given = BacktrackConfig(p_mean=0.3, lr_g=0.02, dsm_sigma="lognormal", threads=2, loss="dmd")
    cfg, sources = resolve_backtrack(given, ring)
    assert (cfg.p_mean, cfg.lr_g, cfg.dsm_sigma, cfg.threads) == (0.3, 0.02, "lognormal", 2)
    assert {sources[k] for k in ("p_mean", "lr_g", "dsm_sigma", "threads")} == {"flag"}
    assert sources["p_std"] == "teacher"


def test_threads_are_left_alone_when_omp_says_or_the_teacher_is_an_image_one(
    ring, digits, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg, sources = resolve_backtrack(BacktrackConfig(), ring)
    assert cfg.threads is None and sources["threads"] == "default"
    monkeypatch.delenv("OMP_NUM_THREADS")
    cfg, sources = resolve_backtrack(BacktrackConfig(), digits)
    assert cfg.threads is None and sources["threads"] == "default"


def test_a_recording_takes_the_teachers_dropout(ring):
    cfg, sources = resolve_record(RecordConfig(teacher="builtin:ring2d"), ring)
    assert (cfg.dropout, sources["dropout"]) == (0.0, "teacher")
    cfg, sources = resolve_record(RecordConfig(teacher="builtin:ring2d", dropout=0.2), ring)
    assert (cfg.dropout, sources["dropout"]) == (0.2, "flag")
    digits = open_teacher("builtin:digits")
    set_dropout(digits.denoiser, 0.13)
    cfg, sources = resolve_record(RecordConfig(teacher="builtin:digits"), digits)
    assert (cfg.dropout, sources["dropout"]) == (0.13, "teacher")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"guidance_scale": 3.0},
            "--guidance-scale is for text-to-image teachers (a diffusers model folder)",
        ),
        (
            {"data": "builtin:ring2d"},
            "--data is for --loss diffratio or --adversary dmd2 or --adversary sida",
        ),
        ({"ratio_width": 12}, "--ratio-width is for --loss diffratio"),
        ({"lr_ratio": 1e-3}, "--lr-ratio is for --loss diffratio"),
        ({"ratio_weighting": "score"}, "--ratio-weighting is for --loss diffratio"),
        (
            {"fake_guidance_scale": 2.0},
            "--fake-guidance-scale is for text-to-image teachers (a diffusers model folder)",
        ),
        (
            {"loss": "diffratio", "data": "builtin:ring2d", "lr_fake": 1e-3},
            "--lr-fake is for score distillation",
        ),
    ],
)
def test_an_option_of_another_family_or_fake_side_is_refused_naming_its_owner(
    ring, options, message
):
    with pytest.raises(ConfigError) as caught:
        resolve_backtrack(BacktrackConfig(**options), ring)
    assert str(caught.value) == message


class Owner:
    def __init__(self, description: str, options: dict) -> None:
        self.description, self.options = description, options


def test_foreign_options_at_their_unused_value_or_taken_by_the_run_pass():
    cfg = BacktrackConfig(guidance_scale=1.0, data="builtin:ring2d")
    other = Owner("others", {"guidance_scale": 1.0, "data": None, "not_a_field": 5})
    refuse_foreign_options(cfg, [other], [Owner("mine", {"data": None})])  # data is mine too
    with pytest.raises(ConfigError, match=r"^--data is for others$"):
        refuse_foreign_options(cfg, [other], [])


def test_a_discrete_noise_rule_is_for_discrete_time_teachers(ring):
    with pytest.raises(ConfigError, match=r"^--dsm-sigma discrete is for discrete-time"):
        resolve_backtrack(BacktrackConfig(dsm_sigma="discrete"), ring)


def test_the_family_and_the_fake_side_see_the_run_and_fill_in_what_they_own(ring, monkeypatch):
    """What a family or a fake side sets wins over the generic defaults, with its source; each
    is handed the config, the teacher, the trajectory's manifest and the dicts it fills."""
    seen = {}
    recorded = object()

    def family_resolve(cfg, teacher, update, sources, recorded=None):
        seen["family"] = (cfg, teacher, recorded)
        update["dsm_sigma"], sources["dsm_sigma"] = "karras", "the family"

    class SpySide(ScoreFake):
        def resolve(self, cfg, teacher, update, sources):
            seen["side"] = (cfg, teacher)
            update["lr_fake"], sources["lr_fake"] = 0.5, "the fake side"

    monkeypatch.setattr(ring.family, "resolve", family_resolve)
    monkeypatch.setitem(FAKE_SIDES, "score", SpySide)
    given = BacktrackConfig(loss="vsd")
    cfg, sources = resolve_backtrack(given, ring, recorded)
    assert seen["family"] == (given, ring, recorded) and seen["side"] == (given, ring)
    assert (cfg.dsm_sigma, sources["dsm_sigma"]) == ("karras", "the family")
    assert (cfg.lr_fake, sources["lr_fake"]) == (0.5, "the fake side")


def test_the_family_chooses_g0s_noise_level_for_a_recording(ring, monkeypatch):
    seen = {}

    def resolve_g0(cfg, teacher, student_sigma, update, sources):
        seen["g0"] = (teacher, student_sigma)
        update["sigma_init"], sources["sigma_init"] = 7.0, "the family"

    monkeypatch.setattr(ring.family, "resolve_g0", resolve_g0)
    cfg, sources = resolve_record(RecordConfig(teacher="builtin:ring2d"), ring)
    assert seen["g0"] == (ring, None)
    assert (cfg.sigma_init, sources["sigma_init"]) == (7.0, "the family")


def test_weight_decay_is_checked_against_the_resolved_optimiser(ring):
    """The optimiser may come from the teacher's family (Adam for vector teachers): a decay
    given without AdamW is refused once the optimiser is known, naming where it came from."""
    with pytest.raises(ConfigError) as caught:
        resolve_backtrack(BacktrackConfig(weight_decay=0.05), ring)
    assert str(caught.value) == (
        "--weight-decay needs --optimizer adamw (the default for vector teachers is adam)"
    )
    cfg, _ = resolve_backtrack(BacktrackConfig(weight_decay=0.05, optimizer="adamw"), ring)
    assert (cfg.weight_decay, cfg.optimizer) == (0.05, "adamw")
    assert resolve_backtrack(BacktrackConfig(), ring)[0].weight_decay == 0.0
