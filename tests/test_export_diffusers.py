"""`disback export --format diffusers` (issue 31): the exported pipeline folder, opened by
diffusers alone, draws the generator's images from the same latents; the UNet folder alone does
the same inside the teacher's pipeline; weights are cast; and the refusals: one line, before
anything is written."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra is not installed")

from t2i_fixtures import make_sd_folder, write_prompts
from test_text_to_image_pipeline import BACKTRACK, RECORD

from conftest import run_cli
from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.config.export import ExportConfig
from disback_cli.errors import ConfigError
from disback_cli.method.generator import OneStepGenerator, load_generator
from disback_cli.models.text_to_image.export import (
    DiffusersExport,
    lcm_settings,
    one_step_timestep,
)
from disback_cli.models.text_to_image.sampling import open_sampling
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.export import open_export_source
from disback_cli.stages.record import run_record
from disback_cli.store.export_folder import RECORD as EXPORT_RECORD
from disback_cli.store.manifests import generator_file_of_run

PROMPT = "a red cat"
# Max |pipeline - disback| per pixel in [0, 1]. Both run the same float32 UNet, text encoders and
# VAE at the same integer timestep, but disback feeds the UNet c_in (sqrt(1 + sigma^2) z) and
# forms x0 = sqrt(1 + sigma^2) z - sigma eps from its float64-derived sigma, diffusers feeds z and
# forms (z - sqrt(1 - a) eps) / sqrt(a) from float32 alphas_cumprod: equal up to a few float32
# roundings, scaled by sigma (14.6 at T = 999) into x0 and carried through the VAE. Measured:
# 3.6e-7 (SD) and 3.9e-7 (SDXL), about 6 float32 steps at 1.0; the bound leaves a 5x margin.
TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished run per tiny teacher (SD at T = 999, SDXL at T = 399), named "run"."""
    root = tmp_path_factory.mktemp("diffusers-export")
    prompts = write_prompts(root / "prompts.txt")
    out = {}
    for kind, xl, extra in (("sd", False, {}), ("sdxl", True, {"timestep": 399})):
        teacher = make_sd_folder(root / kind, xl=xl)
        traj = root / f"{kind}-path"
        cfg = RecordConfig(teacher=str(teacher), prompts=str(prompts), **extra, **RECORD)
        run_record(cfg, traj)
        run_backtrack(BacktrackConfig(loss="dmd", **BACKTRACK), traj, "run")
        out[kind] = {"teacher": teacher, "trajectory": traj}
    return out


def export(run, out, *flags):
    args = ["-T", run["trajectory"], "--name", "run", "--format", "diffusers", "--out", out]
    result = run_cli("export", *args, *flags, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def disback_image(run, z: torch.Tensor) -> np.ndarray:
    """The run's generator applied to z, conditioned and decoded as `disback sample` does."""
    path, sha = generator_file_of_run(run["trajectory"], "run", "ema")
    generator, info = load_generator(path, torch.device("cpu"), sha)
    encoder, decoder = open_sampling(info["text_to_image"], "cpu")
    with torch.no_grad():
        image = decoder(generator(z, **encoder.encode([PROMPT])))
    return (image / 2 + 0.5).permute(0, 2, 3, 1).numpy()


def pipeline_image(pipe, timestep: int, z: torch.Tensor) -> np.ndarray:
    steps = dict(num_inference_steps=1, timesteps=[timestep], guidance_scale=0)
    return pipe(PROMPT, latents=z.clone(), output_type="np", **steps).images


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))


def run_card_code(summary) -> dict:
    """The model card's code, run in the export folder as it says; its variables."""
    namespace: dict = {}
    with contextlib.chdir(summary["out"]):
        exec(summary["card"]["usage"]["snippet"], namespace)
    assert namespace["image"].size == (16, 16)
    return namespace


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_pipeline_folder_draws_the_generators_image(runs, kind, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    run = runs[kind]
    summary = export(run, tmp_path / "e", "--pipeline")
    facts = summary["card"]["usage"]
    timestep = 399 if kind == "sdxl" else 999
    assert facts["scheduler"] == "LCMScheduler" and facts["timestep"] == timestep
    assert f"timesteps=[{timestep}]" in facts["snippet"]
    parts = {
        "README.md",
        "model_index.json",
        "scheduler",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
    }
    parts |= {"text_encoder_2", "tokenizer_2"} if kind == "sdxl" else set()
    assert {name.split("/")[0] for name in summary["files"]} == parts
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "e")
    expected_class = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    assert type(pipe).__name__ == expected_class
    assert isinstance(pipe.scheduler, LCMScheduler)
    z = latents()
    expected, got = disback_image(run, z), pipeline_image(pipe, timestep, z)
    assert got.shape == expected.shape == (1, 16, 16, 3)
    assert np.abs(got - expected).max() <= TOLERANCE
    assert np.array_equal(pipeline_image(run_card_code(summary)["pipe"], timestep, z), got)


def test_the_unet_folder_alone_runs_in_the_teachers_pipeline(runs, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    run = runs["sd"]
    summary = export(run, tmp_path / "e")
    assert summary["files"] == [
        "README.md",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    scheduler = run_card_code(summary)["scheduler"]  # the card's LCMScheduler settings
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "e" / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(run["teacher"], unet=unet, scheduler=scheduler)
    assert isinstance(pipe.scheduler, LCMScheduler)
    z = latents()
    got = pipeline_image(pipe, 999, z)
    assert np.abs(got - disback_image(run, z)).max() <= TOLERANCE


def test_fp16_weights_and_a_changed_or_linked_teacher_file_is_refused_before_writing(
    runs, tmp_path
):
    from safetensors.torch import load_file

    run = runs["sd"]
    export(run, tmp_path / "half", "--dtype", "fp16")
    weights = load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    vae = run["teacher"] / "vae" / "diffusion_pytorch_model.safetensors"
    config = run["teacher"] / "vae" / "config.json"
    original = vae.read_bytes()
    args = ["-T", run["trajectory"], "--name", "run", "--format", "diffusers", "--pipeline"]
    try:
        vae.write_bytes(original[:-4] + bytes(4))
        changed = run_cli("export", *args, "--dtype", "fp16", "--out", tmp_path / "changed")
        vae.write_bytes(original)
        (tmp_path / "config.json").write_bytes(config.read_bytes())  # same bytes, behind a link
        config.rename(tmp_path / "saved.json")
        config.symlink_to(tmp_path / "config.json")
        linked = run_cli("export", *args, "--out", tmp_path / "linked")
    finally:
        vae.write_bytes(original)
        if (tmp_path / "saved.json").exists():
            config.unlink(missing_ok=True)
            (tmp_path / "saved.json").rename(config)
    for result, out, path, phrase in (
        (changed, tmp_path / "changed", vae, "sha256 differs"),
        (linked, tmp_path / "linked", config, "symbolic link"),
    ):  # bad input files: exit code 1
        assert result.code == 1 and result.stderr.count("\n") == 1, result.stderr
        assert f"{path}: " in result.stderr and phrase in result.stderr, result.stderr
        assert not out.exists() or [p.name for p in out.iterdir()] in ([], [EXPORT_RECORD])


def test_generators_no_scheduler_feeds_are_refused(runs):
    """An explicit --sigma-init generator (input scale sigma), one at a fractional timestep and
    one at timestep 0, where LCM returns its input; below T = 205 a larger timestep scaling."""
    source = open_export_source(ExportConfig(format="diffusers"), runs["sd"]["trajectory"], "run")
    denoiser, sigma = source.generator.denoiser, source.generator.sigma_init

    def at(sigma, scale=None):
        scale = (1 + sigma**2) ** 0.5 if scale is None else scale
        return dataclasses.replace(source, generator=OneStepGenerator(denoiser, sigma, scale))

    middle = float((denoiser.sigmas[500] * denoiser.sigmas[501]).sqrt())
    for refused, phrase in (
        (at(sigma, sigma), "--sigma-init"),
        (at(middle), "fractional timestep"),
        (at(float(denoiser.sigmas[0])), "timestep 0"),
    ):
        with pytest.raises(ConfigError, match=phrase) as refusal:
            DiffusersExport().check(ExportConfig(), refused)
        assert "\n" not in str(refusal.value)
    low = at(float(denoiser.sigmas[100]))
    assert one_step_timestep(low) == 100
    assert lcm_settings(low, 100)["timestep_scaling"] == 2**12 / 100
    assert lcm_settings(source, 999)["timestep_scaling"] == 10.0


def test_a_moved_teacher_folder_is_named_with_model_folder(runs, tmp_path):
    import shutil

    run = runs["sd"]
    moved = tmp_path / "moved"
    shutil.copytree(run["teacher"], moved)
    args = ["-T", run["trajectory"], "--name", "run", "--format", "diffusers", "--pipeline"]
    wrong = run_cli(
        "export", *args, "--model-folder", tmp_path / "nowhere", "--out", tmp_path / "x"
    )
    assert wrong.code == 1 and wrong.stderr.count("\n") == 1 and "missing" in wrong.stderr
    summary = export(run, tmp_path / "e", "--pipeline", "--model-folder", str(moved))
    assert "vae/diffusion_pytorch_model.safetensors" in summary["files"]
