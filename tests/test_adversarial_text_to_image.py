"""The adversarial family on text-to-image teachers (tiny random diffusers models): the UNet's
features, captioned latents as real data, each component through record -> backtrack -> sample,
and the refusals of bad latents files (one line, nothing written)."""

from __future__ import annotations

import json
import re
import shutil
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra is not installed")

from safetensors.torch import load_file, save_file
from t2i_fixtures import make_sd_folder, write_prompts
from test_backtrack import At, crash

from conftest import file_digests, run_cli
from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.models.teachers import open_teacher
from disback_cli.models.text_to_image.unet import example_conditions
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, read_manifest

CPU = torch.device("cpu")
RUN = ["--iters", "4", "--interval", "2", "--batch", "2", "--log-every", "2", "--save-every", "4"]
RUN += ["--fake-steps", "1"]  # the text-to-image defaults take 5 or 10: the pipeline is what counts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i-adversarial")
    return {
        "sd": make_sd_folder(root / "sd"),
        "sdxl": make_sd_folder(root / "sdxl", xl=True),
        "prompts": write_prompts(root / "prompts.txt"),
        "root": root,
    }


def record_path(models, name: str, **extra):
    """A 2-node path of the tiny SD teacher, measured on a 16-sample probe."""
    out = models["root"] / name
    sd, prompts = str(models["sd"]), str(models["prompts"])
    common = dict(iters=4, nodes=2, batch=4, probe_samples=16, device="cpu")
    run_record(RecordConfig(teacher=sd, prompts=prompts, **common, **extra), out)
    return out


@pytest.fixture(scope="module")
def sd_path(models):
    return record_path(models, "path")


def latents_file(path, shape, count=6, captions=None, **metadata) -> str:
    """Captioned latents as a user makes them (VAE latents x scaling factor)."""
    captions = [f"a photo number {i}" for i in range(count)] if captions is None else captions
    tensors = {"latents": torch.randn(count, *shape, generator=torch.Generator().manual_seed(0))}
    save_file(tensors, str(path), metadata={"captions": json.dumps(captions), **metadata})
    return str(path)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_unet_features_are_its_forward_pass_stopped_after_the_mid_block(models, xl):
    teacher = open_teacher(str(models["sdxl" if xl else "sd"]), CPU)
    denoiser, unet = teacher.denoiser, teacher.denoiser.model.unet
    seen = {}

    def keep(name, take):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as it was
            seen[name] = take(output)

        return hook

    unet.down_blocks[-1].register_forward_hook(keep("encoder", lambda output: output[0]))
    unet.mid_block.register_forward_hook(keep("middle", lambda output: output))
    generator = torch.Generator().manual_seed(1)
    shapes = example_conditions(dict(unet.config), 2)  # random values of the right shapes
    cond = {key: torch.randn(v.shape, generator=generator) for key, v in shapes.items()}
    x = torch.randn(2, *denoiser.data_shape, generator=generator)
    sigma = torch.tensor([0.5, 3.0])
    denoiser(x, sigma, **cond)
    for where in ("middle", "encoder"):
        assert torch.equal(denoiser.features(x, sigma, where, **cond), seen[where]), where


@pytest.mark.parametrize(
    "flags",
    [
        ("--loss", "dmd", "--adversary", "dmd2", "--warmup", "3"),
        ("--loss", "sid", "--adversary", "sida"),
        ("--loss", "vsd", "--adversary", "dmd2", "--f-divergence", "js"),
    ],
    ids=["dmd2-warmup", "sida", "f-distill"],
)
def test_each_component_runs_record_backtrack_sample_on_captioned_latents(
    sd_path, models, tmp_path, flags
):
    traj = tmp_path / "t"
    shutil.copytree(sd_path, traj)
    teacher = open_teacher(str(models["sd"]), CPU)
    data = latents_file(tmp_path / "real.safetensors", teacher.denoiser.data_shape)
    args = ["backtrack", "-T", traj, "--name", "run", *RUN, "--device", "cpu", "--quiet"]
    result = run_cli(*args, *flags, "--data", data)
    assert result.code == 0, result.stderr
    run = traj / "backtrack" / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["source"] == data and manifest["data"]["count"] == 6
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_disc" in last and "loss_gan_g" in last
    assert ("ratio_weight_std" in last) == ("--f-divergence" in flags)  # f-distill weighed
    out = tmp_path / "images"
    prompts = ("--prompts", models["prompts"])
    result = run_cli(
        "sample", "-T", traj, "--name", "run", *prompts, "-n", "1", "--out", out, "--json"
    )
    assert result.code == 0, result.stderr
    assert len(list(out.glob("**/*.png"))) == json.loads(result.stdout)["n"] >= 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, shape: latents_file(p, (shape[0], 4, 4)), "latents of shape"),
        (lambda p, shape: latents_file(p, shape, captions=["one"]), "6 latents and 1 captions"),
        (lambda p, shape: latents_file(p, shape, captions=[1, 2, 3, 4, 5, 6]), "list of strings"),
        (lambda p, shape: str(p.parent), "a .safetensors file of VAE latents"),
        (lambda p, shape: p.write_bytes(b"\x10" + bytes(64)) and str(p), "not a valid safetensors"),
    ],
    ids=["shape", "count", "captions", "folder", "corrupt"],
)
def test_bad_latents_are_refused_in_one_line_before_anything_is_written(
    sd_path, models, tmp_path, make, message
):
    teacher = open_teacher(str(models["sd"]), CPU)
    data = make(tmp_path / "real.safetensors", teacher.denoiser.data_shape)
    args = ["backtrack", "-T", sd_path, "--name", "refused", *RUN, "--device", "cpu"]
    result = run_cli(*args, "--adversary", "dmd2", "--data", data)
    assert result.code != 0
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (sd_path / "backtrack" / "refused").exists()


def test_the_discriminator_sees_the_teachers_own_timesteps(models):
    """DMD2 on SD noises at randint(0, max_timestep) of the scheduler, not at EDM's levels."""
    teacher = open_teacher(str(models["sd"]), CPU)
    table = teacher.denoiser.sigmas
    levels = teacher.family.discriminator_levels(teacher, 300)
    drawn = levels.sample(4000, torch.Generator().manual_seed(0), CPU)
    assert set(drawn.tolist()) == set(table[:300].tolist())  # all of them, and only them


@pytest.fixture(scope="module")
def lora_path(models):
    """A 2-node path recorded as rank-4 adapters (`record --lora-rank 4`)."""
    return record_path(models, "lora-path", lora_rank=4, lr=1e-2)


def test_the_head_beside_lora_adapters_trains_and_resumes_exactly(lora_path, models, tmp_path):
    """`--adversary dmd2 --lora-rank 4` on a path of adapters: the fake score's adapters and the
    head train with one optimiser, the resume point holds them (no full weights), and a run
    crashed after its resume point at iteration 2 ends with the uninterrupted run's files and
    log. peft is not asked to add a second set of adapters to the fake score (node N merged)."""
    traj = tmp_path / "t"
    shutil.copytree(lora_path, traj)
    teacher = open_teacher(str(models["sd"]), CPU)
    data = latents_file(tmp_path / "real.safetensors", teacher.denoiser.data_shape)
    run = dict(iters=4, interval=2, batch=2, log_every=1, save_every=2, fake_steps=1)
    adversarial = dict(adversary="dmd2", data=data, f_divergence="js")
    cfg = BacktrackConfig(loss="dmd", lora_rank=4, device="cpu", **run, **adversarial)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_backtrack(cfg, traj, "whole")
    assert not [w for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(cfg, traj, "broken", reporter=At(3, crash))
    broken = backtrack_dir(traj, "broken")
    assert read_manifest(broken, BacktrackManifest).state.step == 2
    early = load_file(broken / "checkpoints" / "state-00000002.safetensors")
    run_backtrack(cfg, traj, "broken")
    whole = backtrack_dir(traj, "whole")
    assert file_digests(whole) == file_digests(broken)
    timeless = lambda run: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert timeless(whole) == timeless(broken)
    assert all("loss_disc" in line and "ratio_weight_std" in line for line in timeless(whole))

    final = load_file(whole / "checkpoints" / "state-00000004.safetensors")
    kept = {re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+$", ".N", key)) for key in final}
    modules = {key for key in kept if key.startswith("module.")}
    assert modules == {  # adapters of each network, then the head's layers (no full weights)
        *(f"module.{name}.factors.N" for name in ("generator", "generator_ema", "fake.N")),
        "module.fake.N.layers.N.weight",
        "module.fake.N.layers.N.bias",
    }
    head = load_file(whole / "checkpoints" / "head-00000004.safetensors")
    assert all(torch.equal(head[k], final[f"module.fake.1.{k}"]) for k in head)
    for prefix in ("module.fake.0.factors.", "module.fake.1."):  # adapters and head trained
        moved = [k for k in final if k.startswith(prefix) and not torch.equal(final[k], early[k])]
        assert moved, prefix
