"""Text-to-image teachers (issue 17), model level: a diffusers folder read as our denoiser, its
text conditions, classifier-free guidance. Tiny random models made by `t2i_fixtures`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra is not installed")

from t2i_fixtures import PROMPTS, make_sd_folder, write_prompts

from disback_cli.errors import DisbackError
from disback_cli.models.discrete_ddpm import ddpm_sigmas
from disback_cli.models.teachers import open_teacher
from disback_cli.models.text_to_image.guidance import Guided, guided
from disback_cli.models.text_to_image.text import TextEncoder, read_prompts


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="module")
def sd_v(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("models") / "sd-v", prediction="v_prediction")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return make_sd_folder(tmp_path_factory.mktemp("models") / "sdxl", xl=True)


def scheduler_x0(folder, x0, noise, t, hidden, added=None):
    """x0 as a diffusers user computes it: the scheduler noises x0 at integer timestep t, the
    UNet predicts epsilon or v, and the scheduler's alphas turn that back into x0."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    a = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1).float()
    x_t = scheduler.add_noise(x0, noise, t)
    with torch.no_grad():
        out = unet(x_t, t, hidden, added_cond_kwargs=added).sample
    if scheduler.config.prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()
    return a.sqrt() * x_t - (1 - a).sqrt() * out


@pytest.mark.parametrize("which", ["sd", "sd_v", "sdxl"])
def test_our_denoiser_equals_the_scheduler_based_x0(which, request):
    folder = request.getfixturevalue(which)
    teacher = open_teacher(str(folder), "cpu")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 400, 990])
    hidden = torch.randn(3, 77, 16, generator=gen)
    cond, added = {"encoder_hidden_states": hidden}, None
    if which == "sdxl":
        added = {
            "text_embeds": torch.randn(3, 8, generator=gen),
            "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(3, 6),
        }
        cond.update(added)
    expected = scheduler_x0(folder, x0, noise, t, hidden, added)
    sigma = teacher.denoiser.sigmas[t]
    ours = teacher.denoiser(x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma, **cond)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_sigmas_and_timesteps_follow_the_schedule(sd):
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_pretrained(sd / "scheduler").alphas_cumprod.double()
    sigmas = ddpm_sigmas(0.00085, 0.012, "scaled_linear", 1000)
    # diffusers computes its alphas in float32, we in float64
    torch.testing.assert_close(sigmas, ((1 - alphas) / alphas).sqrt(), rtol=1e-4, atol=0)
    denoiser = open_teacher(str(sd), "cpu").denoiser
    t = denoiser.timestep(denoiser.sigmas[[0, 399, 999]])
    torch.testing.assert_close(t, torch.tensor([0.0, 399.0, 999.0]), rtol=0, atol=1e-3)
    between = (denoiser.sigmas[399].log() + denoiser.sigmas[400].log()) / 2
    assert abs(float(denoiser.timestep(between.exp().reshape(1))) - 399.5) < 1e-3
    beyond = denoiser.timestep(torch.tensor([1e-4, 1e4]))  # clamped to the trained range
    assert beyond.tolist() == [0.0, 999.0]


def test_sd_prompts_are_encoded_as_the_pipeline_does(sd):
    from transformers import CLIPTextModel, CLIPTokenizer

    teacher = open_teacher(str(sd), "cpu")
    encoder = TextEncoder(teacher.family.folder, "cpu")
    cond = encoder.encode(PROMPTS[:2])
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    model = CLIPTextModel.from_pretrained(sd / "text_encoder").eval()

    def last_hidden(prompts):
        ids = tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return model(ids)[0]

    torch.testing.assert_close(cond["encoder_hidden_states"], last_hidden(PROMPTS[:2]))
    torch.testing.assert_close(cond["uncond_encoder_hidden_states"], last_hidden(["", ""]))
    assert set(cond) == {"encoder_hidden_states", "uncond_encoder_hidden_states"}


def test_sdxl_prompts_concatenate_penultimate_states_and_zero_the_unconditional(sdxl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    teacher = open_teacher(str(sdxl), "cpu")
    cond = TextEncoder(teacher.family.folder, "cpu").encode(PROMPTS[:3])
    ids = CLIPTokenizer.from_pretrained(sdxl / "tokenizer")(
        PROMPTS[:3], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        one = CLIPTextModel.from_pretrained(sdxl / "text_encoder")(ids, output_hidden_states=True)
        two = CLIPTextModelWithProjection.from_pretrained(sdxl / "text_encoder_2")(
            ids, output_hidden_states=True
        )
    hidden = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
    torch.testing.assert_close(cond["encoder_hidden_states"], hidden)
    torch.testing.assert_close(cond["text_embeds"], two.text_embeds)
    assert not cond["uncond_encoder_hidden_states"].any() and not cond["uncond_text_embeds"].any()
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 3


def test_guidance_is_uncond_plus_scale_times_the_difference(sd):
    teacher = open_teacher(str(sd), "cpu")
    cond = TextEncoder(teacher.family.folder, "cpu").encode(PROMPTS[:2])
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 3.0])
    d = teacher.denoiser
    plain = d(x, sigma, **cond)
    uncond = d(x, sigma, encoder_hidden_states=cond["uncond_encoder_hidden_states"])
    torch.testing.assert_close(
        Guided(d, 3.0)(x, sigma, **cond), uncond + 3 * (plain - uncond), rtol=1e-5, atol=1e-5
    )
    assert guided(d, 1.0) is d and guided(d, None) is d  # scale 1: the unguided target itself


def test_prompt_files_are_lines_or_a_json_list(tmp_path):
    assert read_prompts(write_prompts(tmp_path / "p.txt", ["a", "", " b "]))[0] == ["a", "b"]
    (tmp_path / "p.json").write_text('["x", "y z"]')
    assert read_prompts(tmp_path / "p.json")[0] == ["x", "y z"]
    (tmp_path / "bad.json").write_text('["x", 3]')
    with pytest.raises(DisbackError, match="list of strings"):
        read_prompts(tmp_path / "bad.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DisbackError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_peak_gpu_memory_is_reported_in_gib_and_not_on_the_cpu(monkeypatch):
    from disback_cli.runtime.devices import peak_memory_gib

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    assert peak_memory_gib(torch.device("cuda", 0)) == 3.0
    assert peak_memory_gib(torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("which", "kind", "rate", "fake_steps"),
    [("sd", "SD 1.x/2.x (DMD2 SD1.5)", 1e-5, 10), ("sdxl", "SDXL (DisBack SDXL)", 5e-7, 5)],
)
def test_a_bare_run_takes_the_settings_its_teacher_was_distilled_with(
    which, kind, rate, fake_steps, request, tmp_path
):
    """DMD2's SD 1.5 run and the DisBack SDXL release: AdamW (0.9, 0.999) with weight decay
    0.01, their rates and fake-score steps; each value names its source."""
    from disback_cli.config import BacktrackConfig, RecordConfig
    from disback_cli.config.resolve import resolve_backtrack, resolve_record

    teacher = open_teacher(str(request.getfixturevalue(which)), "cpu")
    prompts = str(write_prompts(tmp_path / "prompts.txt"))
    cfg, sources = resolve_backtrack(BacktrackConfig(prompts=prompts), teacher)
    expected = {
        "lr_g": rate,
        "lr_fake": rate,
        "fake_steps": fake_steps,
        "optimizer": "adamw",
        "betas": (0.9, 0.999),
        "weight_decay": 0.01,
    }
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert {sources[key] for key in expected} == {f"default for {kind}"}
    record, sources = resolve_record(RecordConfig(teacher="x", prompts=prompts), teacher)
    assert (record.lr, sources["lr"]) == (rate, f"default for {kind}")


def test_weight_decay_is_refused_where_the_resolved_optimiser_is_adam(sd, tmp_path):
    from disback_cli.config import BacktrackConfig
    from disback_cli.config.resolve import resolve_backtrack
    from disback_cli.errors import ConfigError

    prompts = str(write_prompts(tmp_path / "prompts.txt"))
    teacher = open_teacher(str(sd), "cpu")
    given = BacktrackConfig(prompts=prompts, weight_decay=0.05)
    assert resolve_backtrack(given, teacher)[0].weight_decay == 0.05  # adamw by default here
    with pytest.raises(ConfigError) as caught:
        resolve_backtrack(given.model_copy(update={"optimizer": "adam"}), teacher)
    assert str(caught.value) == "--weight-decay needs --optimizer adamw (the flag is adam)"
    ring = open_teacher("builtin:ring2d", "cpu")
    with pytest.raises(ConfigError, match=r"the default for vector teachers is adam\)$"):
        resolve_backtrack(BacktrackConfig(weight_decay=0.05), ring)


@pytest.mark.parametrize("rank", [1, 4, 64, 4096])
def test_adapters_default_to_dmd2s_rate_scaled_by_rank(sd, sdxl, rank, tmp_path):
    """DMD2's LoRA SDXL run: 100x the full-weight rate at rank 64 with alpha 8; ours (alpha = r)
    move the weights as far at full rate x 100 / sqrt(r). The source fits a manifest."""
    from disback_cli.config import RecordConfig
    from disback_cli.config.resolve import resolve_record
    from disback_cli.models.text_to_image.lora import adapter_rate
    from disback_cli.store.manifests import MAX_SOURCE_CHARS

    prompts = str(write_prompts(tmp_path / "prompts.txt"))
    for folder, full_rate in ((sd, 1e-5), (sdxl, 5e-7)):
        teacher = open_teacher(str(folder), "cpu")
        given = RecordConfig(teacher="x", prompts=prompts, lora_rank=rank)
        cfg, sources = resolve_record(given, teacher)
        assert cfg.lr == pytest.approx(full_rate * 100 / rank**0.5, rel=1e-12)
        assert sources["lr"].startswith(f"default for rank-{rank} adapters")
        assert len(sources["lr"]) <= MAX_SOURCE_CHARS
    assert resolve_record(given.model_copy(update={"lr": 3e-4}), teacher)[0].lr == 3e-4

    def step(lr, alpha, r):  # how far one Adam step from B = 0 moves W, up to 1 / sqrt(fan_in)
        return (alpha / r) * lr * r**0.5

    ours = step(adapter_rate(1e-5, 64), alpha=64, r=64)
    assert ours == pytest.approx(step(100 * 1e-5, alpha=8, r=64))  # DMD2: 100x, alpha 8


def test_a_dropped_row_is_shown_its_unconditional_twin_and_nothing_else_changes(sdxl, tmp_path):
    from disback_cli.models.text_to_image.folder import read_folder
    from disback_cli.models.text_to_image.text import PromptSource

    encoder = TextEncoder(read_folder(sdxl), "cpu")
    cond = encoder.encode(PROMPTS[:4])
    rows = torch.tensor([True, False, False, True])
    seen = PromptSource.unconditional_rows(cond, rows)
    assert set(seen) == set(cond)
    for key, value in cond.items():
        twin = cond.get("uncond_" + key)
        if twin is None:  # keys without a twin (SDXL's time ids) and the twins themselves
            assert torch.equal(seen[key], value)
            continue
        assert torch.equal(seen[key][rows], twin[rows])
        assert torch.equal(seen[key][~rows], value[~rows])
        assert not torch.equal(twin[~rows], value[~rows])  # a change where it is not asked


def test_recording_shows_the_copy_a_share_of_unconditional_rows_but_g0_its_prompts(sd):
    """G0 draws each sample for its prompt; the copy in training sees about `dropout` of them
    with the unconditional embedding, chosen from the run's stream (the same every time)."""
    from disback_cli.method.dsm import denoising_step
    from disback_cli.method.noise import TrainingSigma
    from disback_cli.models.text_to_image.folder import read_folder
    from disback_cli.models.text_to_image.text import PromptSource

    encoder = TextEncoder(read_folder(sd), "cpu")
    seen = {}

    class Spy(torch.nn.Module):
        """Records the text states it is given; the generator (z only) and the copy alike."""

        def __init__(self, name):
            super().__init__()
            self.name, self.weight = name, torch.nn.Parameter(torch.zeros(()))
            self.sigma_data = 1.0

        def forward(self, x, sigma=None, **cond):
            seen[self.name] = cond["encoder_hidden_states"]
            return x * self.weight

    def dropped(fraction, seed=0):
        source = PromptSource(encoder, PROMPTS, fraction)
        denoiser = Spy("copy")
        opt = torch.optim.SGD(denoiser.parameters(), lr=0.0)
        rng = torch.Generator().manual_seed(seed)
        denoising_step(
            denoiser,
            opt,
            Spy("g0"),
            (400, 4, 8, 8),
            source,
            TrainingSigma("lognormal", -1.2, 1.2),
            rng,
        )
        empty = encoder.encode([""])["encoder_hidden_states"]
        is_empty = (seen["copy"] == empty).flatten(1).all(dim=1)
        assert not (seen["g0"] == empty).flatten(1).all(dim=1).any()  # G0: every prompt
        return is_empty

    assert not dropped(0.0).any()
    share = dropped(0.1)
    assert 0.06 < share.float().mean() < 0.14 and torch.equal(share, dropped(0.1))
    assert not torch.equal(share, dropped(0.1, seed=1))


def test_text_recordings_drop_a_tenth_of_prompts_by_default_and_old_ones_none(sd, tmp_path):
    from disback_cli.config import STORED, RecordConfig
    from disback_cli.config.resolve import resolve_record
    from disback_cli.errors import ConfigError

    prompts = str(write_prompts(tmp_path / "prompts.txt"))
    cfg, sources = resolve_record(
        RecordConfig(teacher="x", prompts=prompts), open_teacher(str(sd), "cpu")
    )
    assert (cfg.uncond_fraction, sources["uncond_fraction"]) == (
        0.1,
        "default for text teachers (SD's caption dropout)",
    )
    ring = open_teacher("builtin:ring2d", "cpu")
    with pytest.raises(ConfigError, match=r"^--uncond-fraction is for text-to-image teachers"):
        resolve_record(RecordConfig(teacher="x", uncond_fraction=0.1), ring)
    stored = {"teacher": "x", "prompts": prompts}
    old = RecordConfig.model_validate(stored, context={STORED: True})
    assert old.uncond_fraction == 0.0 and RecordConfig(**stored).uncond_fraction is None
