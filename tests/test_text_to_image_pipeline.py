"""Text-to-image teachers (issue 17) through every stage, on tiny random diffusers models:
record -> backtrack (each loss) -> sample --prompts -> evaluate --clip, resume bit for bit,
guidance, and the refusals (one line, nothing written)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra is not installed")

from t2i_fixtures import PROMPTS, make_clip_folder, make_sd_folder, write_prompts
from test_backtrack import At, crash

from conftest import file_digests, run_cli
from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import BacktrackManifest, TrajectoryManifest, read_manifest

# Nodes measured on 64 probe samples, not 512: these tests check the pipeline, not the nodes.
RECORD = dict(iters=8, nodes=2, batch=8, lr=1e-3, device="cpu", probe_samples=64)
BACKTRACK = dict(
    iters=6, interval=2, batch=2, lr_g=1e-4, lr_fake=1e-4, save_every=2, log_every=1, device="cpu"
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {
        "sd": make_sd_folder(root / "sd"),
        "sdxl": make_sd_folder(root / "sdxl", xl=True),
        "prompts": write_prompts(root / "prompts.txt"),
        "clip": make_clip_folder(root / "clip"),
    }


@pytest.fixture(scope="module")
def sd_path(models, tmp_path_factory):
    """A recorded 2-node path of the tiny SD teacher (treat as read-only)."""
    out = tmp_path_factory.mktemp("paths") / "sd"
    run_record(
        RecordConfig(teacher=str(models["sd"]), prompts=str(models["prompts"]), **RECORD), out
    )
    return out


def copy_of(path, tmp_path):
    shutil.copytree(path, tmp_path / "t")
    return tmp_path / "t"


def metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in lines]


def test_recording_moves_away_from_the_teacher_on_its_own_timesteps(sd_path, models):
    manifest = read_manifest(sd_path, TrajectoryManifest)
    assert manifest.status == "complete" and [n.index for n in manifest.nodes] == [0, 1, 2]
    distances = [n.dist_to_teacher for n in manifest.nodes]
    assert distances[0] == 0 < distances[1] < distances[2]
    assert manifest.config.dsm_sigma == "discrete" and manifest.config.timestep == 999
    assert manifest.config_sources["sigma_init"] == "timestep"
    denoiser_sigma_999 = manifest.config.sigma_init
    assert manifest.g0.input_scale == pytest.approx((1 + denoiser_sigma_999**2) ** 0.5)
    assert manifest.prompts.count == len(PROMPTS) and manifest.prompts.file.endswith("prompts.txt")


@pytest.mark.parametrize("loss", ["vsd", "dmd", "sid"])
def test_every_loss_backtracks_to_the_teacher_with_guidance(sd_path, tmp_path, loss):
    traj = copy_of(sd_path, tmp_path)
    manifest = run_backtrack(BacktrackConfig(loss=loss, **BACKTRACK), traj, "run")
    assert manifest.status == "complete" and manifest.config.guidance_scale == 1.75
    assert manifest.config_sources["prompts"] == "trajectory"
    lines = metrics(backtrack_dir(traj, "run"))
    assert [ln["target_node"] for ln in lines] == [1, 1, 0, 0, 0, 0]
    for line in lines:
        assert all(np.isfinite(v) for v in line.values() if isinstance(v, float))


def test_guidance_scale_one_is_the_unguided_target(sd_path, tmp_path):
    """The baseline starts with fake = target = teacher: the score gap is exactly zero when the
    target is unguided (scale 1), and not when guidance pulls the target away."""
    traj = copy_of(sd_path, tmp_path)
    first = dict(BACKTRACK, iters=1, save_every=0, no_trajectory=True)
    run_backtrack(BacktrackConfig(guidance_scale=1.0, **first), traj, "plain")
    run_backtrack(BacktrackConfig(guidance_scale=4.0, **first), traj, "guided")
    assert metrics(backtrack_dir(traj, "plain"))[0]["score_gap"] == 0.0
    assert metrics(backtrack_dir(traj, "guided"))[0]["score_gap"] > 0.0


def test_a_fake_score_guided_as_the_target_is_leaves_no_gap_at_the_start(sd_path, tmp_path):
    """SiD-LSG's placement (--fake-guidance-scale): fake = target = teacher, both guided at 4,
    read the same, so the first score gap is exactly zero; the fake score also trains on its
    guided output, so its loss differs from the unguided fake's."""
    traj = copy_of(sd_path, tmp_path)
    first = dict(BACKTRACK, iters=1, save_every=0, no_trajectory=True, guidance_scale=4.0)
    run_backtrack(BacktrackConfig(loss="sid", **first), traj, "unguided")
    run_backtrack(BacktrackConfig(loss="sid", fake_guidance_scale=4.0, **first), traj, "lsg")
    unguided, lsg = (metrics(backtrack_dir(traj, name))[0] for name in ("unguided", "lsg"))
    assert unguided["score_gap"] > 0.0 and lsg["score_gap"] == 0.0
    assert lsg["loss_fake"] != unguided["loss_fake"]
    one = dict(first, guidance_scale=1.0)
    run_backtrack(BacktrackConfig(loss="sid", fake_guidance_scale=1.0, **one), traj, "one")
    run_backtrack(BacktrackConfig(loss="sid", **one), traj, "none")
    assert metrics(backtrack_dir(traj, "one")) == metrics(backtrack_dir(traj, "none"))


def test_a_crashed_run_resumes_bit_for_bit(sd_path, tmp_path):
    traj = copy_of(sd_path, tmp_path)
    cfg = BacktrackConfig(loss="dmd", **BACKTRACK)
    run_backtrack(cfg, traj, "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(cfg, traj, "broken", reporter=At(5, crash))
    assert read_manifest(backtrack_dir(traj, "broken"), BacktrackManifest).step == 4
    run_backtrack(cfg, traj, "broken")
    whole, broken = backtrack_dir(traj, "whole"), backtrack_dir(traj, "broken")
    assert file_digests(whole) == file_digests(broken)
    assert metrics(whole) == metrics(broken)


def test_a_crashed_recording_resumes_to_identical_nodes(sd_path, models, tmp_path):
    cfg = RecordConfig(
        teacher=str(models["sd"]), prompts=str(models["prompts"]), save_every=2, **RECORD
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_record(cfg, tmp_path / "t", reporter=At(7, crash))
    run_record(cfg, tmp_path / "t")
    assert file_digests(tmp_path / "t") == file_digests(sd_path)


def test_sample_decodes_n_images_per_prompt_and_clip_scores_them(sd_path, models, tmp_path):
    traj = copy_of(sd_path, tmp_path)
    run_backtrack(BacktrackConfig(**BACKTRACK), traj, "run")
    out = tmp_path / "images"
    result = run_cli(
        "sample",
        "-T",
        traj,
        "--name",
        "run",
        "--prompts",
        models["prompts"],
        "-n",
        "2",
        "--out",
        out,
        "--json",
    )
    assert result.code == 0, result.stderr
    listing = json.loads((out / "prompts.json").read_text())["images"]
    assert len(listing) == 2 * len(PROMPTS) == json.loads(result.stdout)["n"]
    assert [(e["prompt"], e["seed"]) for e in listing[:3]] == [
        (PROMPTS[0], 0),
        (PROMPTS[0], 1),
        (PROMPTS[1], 0),
    ]
    from PIL import Image

    with Image.open(out / listing[0]["file"]) as image:
        assert image.size == (16, 16) and image.mode == "RGB"  # decoded by the VAE
    scored = run_cli("evaluate", out, "--clip", models["clip"], "--json")
    assert scored.code == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["metric"] == "CLIP score" and report["results"][0]["n"] == len(listing)
    assert report["results"][0]["clip_score"] == pytest.approx(
        independent_clip_score(models["clip"], out, listing), rel=1e-4, abs=1e-4
    )
    sha = report["detector"]["sha256"]
    default = run_cli("sample", "-T", traj, "--name", "run", "-n", "1", "--out", tmp_path / "d")
    assert default.code == 0, default.stderr  # the trajectory's prompts, without --prompts
    assert "the trajectory's" in default.stderr
    drawn = json.loads((tmp_path / "d" / "prompts.json").read_text())["images"]
    assert [e["prompt"] for e in drawn] == PROMPTS
    wrong = run_cli("evaluate", out, "--clip", models["clip"], "--clip-sha256", "0" * 64)
    assert wrong.code == 1 and wrong.stderr.count("\n") == 1 and sha not in wrong.stderr


def independent_clip_score(folder, images_dir, listing) -> float:
    """Mean of 100 cos(image, prompt), computed with transformers' own loaders."""
    import transformers
    from PIL import Image

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    images = [np.asarray(Image.open(images_dir / e["file"]).convert("RGB")) for e in listing]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(
        [e["prompt"] for e in listing],
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        a = model.get_image_features(pixel_values=pixels)
        b = model.get_text_features(input_ids=ids)
    a, b = getattr(a, "pooler_output", a), getattr(b, "pooler_output", b)
    return float((100 * torch.cosine_similarity(a, b, dim=-1)).mean())


def test_sdxl_teacher_records_backtracks_and_samples(models, tmp_path):
    traj = tmp_path / "xl"
    run_record(
        RecordConfig(
            teacher=str(models["sdxl"]), prompts=str(models["prompts"]), timestep=399, **RECORD
        ),
        traj,
    )
    manifest = run_backtrack(BacktrackConfig(loss="dmd", **BACKTRACK), traj, "run")
    assert manifest.config.guidance_scale == 8.0 and manifest.status == "complete"
    assert all(np.isfinite(ln["loss_g"]) for ln in metrics(backtrack_dir(traj, "run")))
    result = run_cli(
        "sample",
        "-T",
        traj,
        "--name",
        "run",
        "--prompts",
        models["prompts"],
        "-n",
        "1",
        "--out",
        tmp_path / "images",
    )
    assert result.code == 0, result.stderr
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(PROMPTS)


# --- refusals: one line, the right exit code, nothing written ----------------------------------


def refused(args: list, code: int, *phrases: str, out=None) -> None:
    result = run_cli(*args)
    assert result.code == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    if out is not None:
        assert not out.exists()


def test_pickle_weights_and_missing_components_are_refused(models, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(models["sd"], bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    out = tmp_path / "out"
    refused(
        ["record", "--teacher", bad, "--prompts", models["prompts"], "--out", out],
        1,
        "diffusion_pytorch_model.bin",
        "pickle",
        "save_pretrained(FOLDER, safe_serialization=True)",
        out=out,
    )
    missing = tmp_path / "missing"
    shutil.copytree(models["sdxl"], missing)
    shutil.rmtree(missing / "tokenizer_2")
    refused(
        ["record", "--teacher", missing, "--prompts", models["prompts"], "--out", out],
        1,
        "tokenizer_2",
        out=out,
    )
    foreign = tmp_path / "foreign"
    shutil.copytree(models["sd"], foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    index["text_encoder"] = ["mylib", "EvilEncoder"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    refused(
        ["record", "--teacher", foreign, "--prompts", models["prompts"], "--out", out],
        1,
        "EvilEncoder",
        out=out,
    )


def test_flags_that_do_not_fit_the_teacher_are_refused(models, sd_path, tmp_path):
    out = tmp_path / "out"
    sd = ["record", "--teacher", models["sd"], "--out", out, "--iters", "2", "--nodes", "1"]
    refused(sd, 2, "--prompts", out=out)
    refused(
        [*sd, "--prompts", models["prompts"], "--dsm-sigma", "lognormal"], 2, "discrete", out=out
    )
    refused([*sd, "--prompts", models["prompts"], "--timestep", "1000"], 2, "0..999", out=out)
    ring = ["record", "--teacher", "builtin:ring2d", "--out", out, "--iters", "2", "--nodes", "1"]
    refused([*ring, "--timestep", "399"], 2, "text-to-image", out=out)
    refused([*ring, "--prompts", models["prompts"]], 2, "text-to-image", out=out)
    ring_path = tmp_path / "ring"
    assert run_cli(*ring[:3], "--out", ring_path, "--iters", "2", "--nodes", "1").code == 0
    refused(["backtrack", "-T", ring_path, "--lora-rank", "4"], 2, "text-to-image")
    assert not (ring_path / "backtrack").exists()
    traj = copy_of(sd_path, tmp_path)
    (tmp_path / "changed.txt").write_text(models["prompts"].read_text() + "one more\n")
    manifest = json.loads((traj / "manifest.json").read_text())
    manifest["prompts"]["file"] = str(tmp_path / "changed.txt")  # as if the file were edited
    (traj / "manifest.json").write_text(json.dumps(manifest))
    before = file_digests(traj, "**/*.*")
    refused(["backtrack", "-T", traj, "--prompts", tmp_path / "nope.txt"], 1, "nope.txt")
    refused(["backtrack", "-T", traj, "--iters", "2"], 1, "sha256", "--prompts")
    assert file_digests(traj, "**/*.*") == before and not (traj / "backtrack").exists()
    other = write_prompts(tmp_path / "other.txt", ["a new prompt"])
    assert (
        run_cli(
            "backtrack",
            "-T",
            traj,
            "--prompts",
            other,
            "--iters",
            "1",
            "--batch",
            "2",
            "--device",
            "cpu",
        ).code
        == 0
    )


# --- path nodes as low-rank adapters -----------------------------------------------------------


@pytest.fixture(scope="module")
def lora_path(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("paths") / "lora"
    cfg = RecordConfig(
        teacher=str(models["sd"]),
        prompts=str(models["prompts"]),
        lora_rank=4,
        **{**RECORD, "lr": 1e-2},
    )
    run_record(cfg, out)
    return out


def test_lora_at_its_default_rate_moves_the_path_as_far_as_full_weights(models, tmp_path):
    """The same recording as full weights and as rank-4 adapters, each at its default rate: the
    adapters' path goes at least half as far from the teacher and fits G0 at least half as much
    better. (At the full-weight rate they moved about 30x less: the path stayed at the
    teacher.)"""
    common = dict(teacher=str(models["sd"]), prompts=str(models["prompts"]), iters=30, nodes=1)
    common.update(batch=8, device="cpu")
    full = run_record(RecordConfig(**common), tmp_path / "full")
    adapters = run_record(RecordConfig(**common, lora_rank=4), tmp_path / "lora")
    assert adapters.config.lr == 100 * full.config.lr / 2  # x 100 / sqrt(rank)
    assert adapters.config_sources["lr"].startswith("default for rank-4 adapters")

    def moved(manifest):
        first, last = manifest.nodes[0], manifest.nodes[-1]
        return last.dist_to_teacher, 1 - last.g0_loss / first.g0_loss

    (full_distance, full_fit), (distance, fit) = moved(full), moved(adapters)
    assert full_distance > 0 and full_fit > 0
    assert distance >= 0.5 * full_distance and fit >= 0.5 * full_fit, (moved(full), moved(adapters))


def test_adapters_too_slow_to_move_the_path_are_named_before_recording(models, tmp_path):
    """--lr at the full-weight rate with --lora-rank: one warning line on stderr before the run
    starts (even with --json), listed in the JSON; each node's fit is reported against the
    teacher's."""
    args = ["record", "-t", models["sd"], "--prompts", models["prompts"], "--iters", "2"]
    args += ["--nodes", "1", "--batch", "2", "--probe-samples", "64", "--device", "cpu"]
    args += ["--json", "--out", tmp_path / "t"]
    result = run_cli(*args, "--lora-rank", "4", "--lr", "1e-5")
    assert result.code == 0, result.stderr
    warning = (
        "rank-4 adapters at --lr 1e-05 move the path far less than full weights at 1e-05 (the "
        "default for rank 4 is 0.0005); the path may barely leave the teacher"
    )
    assert result.stderr.splitlines()[0] == f"warning: {warning}"  # before the fit check's
    report = json.loads(result.stdout)
    assert warning in report["warnings"]
    teacher, node = report["nodes"]
    assert teacher["g0_loss_vs_teacher"] == 1.0
    assert node["g0_loss_vs_teacher"] == pytest.approx(node["g0_loss"] / teacher["g0_loss"])
    quiet = run_cli(*args[:-1], tmp_path / "u", "--lora-rank", "4")  # at its default rate
    assert quiet.code == 0 and "adapters" not in quiet.stderr


def test_lora_nodes_are_small_and_move_along_the_path(lora_path, sd_path):
    manifest = read_manifest(lora_path, TrajectoryManifest)
    distances = [n.dist_to_teacher for n in manifest.nodes]
    assert distances[0] == 0 < distances[1] < distances[2]
    lora_size = (lora_path / "nodes" / "node-001.safetensors").stat().st_size
    full_size = (sd_path / "nodes" / "node-001.safetensors").stat().st_size
    assert lora_size * 5 < full_size  # rank 4 on a 52k-parameter UNet: ~2.7k parameters


def test_lora_targets_are_the_recorded_nodes_and_merge_into_plain_weights(lora_path, models):
    from disback_cli.models.teachers import open_teacher
    from disback_cli.models.text_to_image.lora import LoraPathNodes

    traj = read_manifest(lora_path, TrajectoryManifest)
    teacher = open_teacher(str(models["sd"]))
    gen = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([0.3, 4.0])
    cond = {"encoder_hidden_states": torch.randn(2, 77, 16, generator=gen)}
    reference = teacher.denoiser(x, sigma, **cond)  # before the nodes adapt the teacher in place
    nodes = LoraPathNodes(lora_path, traj, teacher)
    assert torch.equal(nodes.at(0)(x, sigma, **cond), reference)  # zero adapters: the teacher
    adapted = nodes.at(2)(x, sigma, **cond)
    assert (adapted - reference).abs().max() > 1e-3
    merged = nodes.copy_of(2)
    assert not any("lora" in k for k in merged.state_dict())
    assert set(merged.state_dict()) == set(open_teacher(str(models["sd"])).denoiser.state_dict())
    torch.testing.assert_close(merged(x, sigma, **cond), adapted, rtol=1e-4, atol=1e-5)


def test_lora_recording_resumes_bit_for_bit_from_adapter_only_state(lora_path, models, tmp_path):
    cfg = RecordConfig(
        teacher=str(models["sd"]),
        prompts=str(models["prompts"]),
        lora_rank=4,
        save_every=2,
        **{**RECORD, "lr": 1e-2},
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_record(cfg, tmp_path / "t", reporter=At(7, crash))
    (state,) = (tmp_path / "t" / "state").iterdir()
    unet = models["sd"] / "unet" / "diffusion_pytorch_model.safetensors"
    assert state.stat().st_size < unet.stat().st_size  # full weights + Adam would be 3x it
    run_record(cfg, tmp_path / "t")
    assert file_digests(tmp_path / "t") == file_digests(lora_path)


def test_the_fake_score_starts_as_an_own_copy_of_node_n_on_lora_nodes(lora_path, models):
    """Eq. 5's fake starts at the path's last node, not a neighbour and not the teacher, and
    training it must not move the targets it was copied from."""
    from disback_cli.method.fake_sides import ScoreFake
    from disback_cli.models.teachers import open_teacher
    from disback_cli.runtime.parallel import Execution

    traj = read_manifest(lora_path, TrajectoryManifest)
    gen = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([0.5, 3.0])
    cond = {"encoder_hidden_states": torch.randn(2, 77, 16, generator=gen)}
    ex = Execution(torch.device("cpu"))

    def fake_and_targets(**options):
        cfg = BacktrackConfig(**{**BACKTRACK, **options})
        teacher = open_teacher(str(models["sd"]))
        return ScoreFake().build(cfg, lora_path, traj, teacher, None, ex)

    fake, targets = fake_and_targets()
    with torch.no_grad():
        node_n = targets.at(traj.last_node)(x, sigma, **cond)
        torch.testing.assert_close(fake(x, sigma, **cond), node_n, rtol=1e-4, atol=1e-5)
        before = targets.at(traj.last_node - 1)(x, sigma, **cond)
        assert (fake(x, sigma, **cond) - before).abs().max() > 1e-3
        for p in fake.parameters():
            p.add_(0.1)
        assert torch.equal(targets.at(traj.last_node)(x, sigma, **cond), node_n)
    targets.close()
    fake, targets = fake_and_targets(no_trajectory=True)
    with torch.no_grad():
        torch.testing.assert_close(
            fake(x, sigma, **cond), targets.at(0)(x, sigma, **cond), rtol=1e-4, atol=1e-5
        )
    targets.close()


def test_every_lora_node_is_matched_against_the_network_when_the_targets_open(
    lora_path, models, tmp_path
):
    """A spoiled node 1 (hash consistent, one factor renamed) is refused at the start, not at
    its switch near the end of the run."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from disback_cli.errors import DisbackError
    from disback_cli.models.teachers import open_teacher
    from disback_cli.models.text_to_image.lora import LoraPathNodes
    from disback_cli.store.fileio import sha256_file

    traj = copy_of(lora_path, tmp_path)
    node = traj / "nodes" / "node-001.safetensors"
    with safe_open(str(node), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(node)
    first = sorted(tensors)[0]
    tensors[first.replace("lora_A", "lora_Z")] = tensors.pop(first)
    save_file(tensors, str(node), metadata)
    manifest = read_manifest(traj, TrajectoryManifest)
    manifest.nodes[1].sha256 = sha256_file(node)
    with pytest.raises(DisbackError, match=r"node-001\.safetensors: adapters do not match"):
        LoraPathNodes(traj, manifest, open_teacher(str(models["sd"])))


def test_backtracking_along_lora_nodes(lora_path, tmp_path):
    traj = copy_of(lora_path, tmp_path)
    first = dict(BACKTRACK, iters=1, save_every=0, guidance_scale=1.0)
    run_backtrack(BacktrackConfig(no_trajectory=True, **first), traj, "base")
    assert metrics(backtrack_dir(traj, "base"))[0]["score_gap"] == 0.0
    manifest = run_backtrack(BacktrackConfig(**BACKTRACK), traj, "run")
    lines = metrics(backtrack_dir(traj, "run"))
    assert manifest.status == "complete" and lines[0]["score_gap"] > 0
    assert [ln["target_node"] for ln in lines] == [1, 1, 0, 0, 0, 0]


def test_a_one_step_unet_folder_is_g0_at_its_timestep(models, tmp_path):
    """As the DisBack SDXL release starts from DMD2's one-step UNet fed pure noise at t=399."""
    student = tmp_path / "one-step-unet"
    shutil.copytree(models["sd"] / "unet", student)
    traj = tmp_path / "t"
    cfg = RecordConfig(
        teacher=str(models["sd"]),
        prompts=str(models["prompts"]),
        student=str(student),
        timestep=399,
        **RECORD,
    )
    manifest = run_record(cfg, traj)
    assert manifest.g0.kind == "file" and manifest.g0.file == str(student)
    sigma = manifest.g0.sigma_init
    assert manifest.g0.input_scale == pytest.approx((1 + sigma**2) ** 0.5) and 0.5 < sigma < 2
    assert run_backtrack(BacktrackConfig(**BACKTRACK), traj, "run").status == "complete"
    weights = student / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # the student changed since
    refused(["backtrack", "-T", traj, "--name", "again", "--iters", "2"], 1, "sha256")


def test_absurd_component_configs_are_refused_before_anything_is_built(models, sd_path, tmp_path):
    huge = tmp_path / "huge-encoder"
    shutil.copytree(models["sd"], huge)
    config = json.loads((huge / "text_encoder" / "config.json").read_text())
    config.update(hidden_size=60000, intermediate_size=60000, num_hidden_layers=64)
    (huge / "text_encoder" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(
        ["record", "--teacher", huge, "--prompts", models["prompts"], "--out", out],
        1,
        "text encoder config asks for",
        out=out,
    )
    traj = copy_of(sd_path, tmp_path)
    run_backtrack(BacktrackConfig(**{**BACKTRACK, "iters": 1, "save_every": 0}), traj, "run")
    moved = tmp_path / "moved-model"
    shutil.copytree(models["sd"], moved)
    vae = json.loads((moved / "vae" / "config.json").read_text())
    vae["block_out_channels"] = [60000, 60000]
    (moved / "vae" / "config.json").write_text(json.dumps(vae))
    images = tmp_path / "images"
    refused(
        [
            "sample",
            "-T",
            traj,
            "--name",
            "run",
            "--prompts",
            models["prompts"],
            "-n",
            "1",
            "--model-folder",
            moved,
            "--no-verify",
            "--out",
            images,
        ],
        1,
        "VAE config asks for",
        out=images,
    )


ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")


def test_lora_backtracking_trains_saves_and_resumes_adapters_only(sd_path, models, tmp_path):
    """`backtrack --lora-rank`: only the generator's adapted projections move (its other weights
    stay G0's, the teacher's, bit for bit), the resume point holds the adapters alone, and a
    crashed run resumes to the same files."""
    from safetensors.torch import load_file

    from disback_cli.models.teachers import open_teacher

    traj = copy_of(sd_path, tmp_path)
    cfg = BacktrackConfig(loss="dmd", lora_rank=4, **{**BACKTRACK, "lr_g": 1e-2, "lr_fake": 1e-2})
    run_backtrack(cfg, traj, "whole")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(cfg, traj, "broken", reporter=At(5, crash))
    broken = backtrack_dir(traj, "broken")
    state = broken / read_manifest(broken, BacktrackManifest).state.file
    unet = models["sd"] / "unet" / "diffusion_pytorch_model.safetensors"
    assert state.stat().st_size < unet.stat().st_size  # full weights and Adam: 6x it
    kept = {re.sub(r"\.\d+", ".N", key) for key in load_file(state) if not key.startswith("rng")}
    assert kept == {  # per network, the adapters' factors and their Adam moments
        *(f"module.{name}.factors.N" for name in ("generator", "generator_ema", "fake")),
        *(f"optim.{n}.N.{m}" for n in ("generator", "fake") for m in ADAM_STATE),
    }
    run_backtrack(cfg, traj, "broken")
    whole = backtrack_dir(traj, "whole")
    assert file_digests(whole) == file_digests(broken)
    assert metrics(whole) == metrics(broken)

    teacher = open_teacher(str(models["sd"])).denoiser.state_dict()
    trained = load_file(whole / "checkpoints" / "generator-00000006.safetensors")
    assert trained.keys() == teacher.keys()  # plain weights, the adapters merged in
    adapted = [k for k in trained if any(f".{t}.weight" in k for t in ("to_q", "to_k", "to_v"))]
    assert adapted and all(not torch.equal(trained[k], teacher[k]) for k in adapted)
    out = [k for k in trained if ".to_out.0." in k or any(f".{t}." in k for t in ("to_q", "to_k"))]
    assert all(torch.equal(trained[k], teacher[k]) for k in trained if k not in [*adapted, *out])


def test_lora_backtracking_defaults_and_memory(sd_path, models):
    """Adapters train at the full-weight rate x 100 / sqrt(rank) (DMD2's LoRA run), and the run
    holds four UNets: generator, fake score, target, next node."""
    from types import SimpleNamespace

    from disback_cli.config.resolve import resolve_backtrack
    from disback_cli.method.fake_sides import make_fake_side
    from disback_cli.stages.backtrack import memory_plan
    from disback_cli.stages.trajectory import open_trajectory

    traj, teacher = open_trajectory(sd_path, None, "cpu")
    cfg, sources = resolve_backtrack(BacktrackConfig(lora_rank=16), teacher, traj)
    assert cfg.lr_g == pytest.approx(1e-5 * 100 / 4) and cfg.lr_fake == cfg.lr_g
    assert "rank-16 adapters" in sources["lr_g"]
    one = SimpleNamespace(layout=SimpleNamespace(shards=1))
    plan = memory_plan(cfg, traj, teacher, make_fake_side(cfg), one)
    whole = memory_plan(BacktrackConfig(), traj, teacher, make_fake_side(cfg), one)
    assert plan.count == 4 and whole.count == 11
    assert "generator (frozen; adapters train)" in plan.describe()


def test_merged_weights_read_one_at_a_time_equal_a_merged_copy(models):
    """What a LoRA generator file is written from: the plain tensor names, each adapted weight
    merged when read, equal to merging a copy of the network."""
    from disback_cli.models.teachers import open_teacher
    from disback_cli.models.text_to_image.lora import MergedWeights, add_lora, merged

    denoiser = open_teacher(str(models["sd"])).denoiser
    plain = denoiser.state_dict()
    add_lora(denoiser, 4, seed=0)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero: make the adapters count
    lazy, copied = MergedWeights(denoiser), merged(denoiser).state_dict()
    assert list(lazy) == list(copied) == list(plain)
    assert all(torch.equal(lazy[k], copied[k]) for k in copied)
    assert sum(not torch.equal(lazy[k], plain[k]) for k in plain) == len(lazy.layers)
