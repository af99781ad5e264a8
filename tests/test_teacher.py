import torch

from disback_cli.config.teacher_train import TeacherTrainConfig
from disback_cli.evaluation.ground_truth import evaluate_vectors
from disback_cli.method.generator import build_g0
from disback_cli.method.sampling import edm_sampler, seeded_noise
from disback_cli.models.denoiser_files import load_denoiser
from disback_cli.models.teachers import open_teacher
from disback_cli.stages.train_teacher import train_teacher
from disback_cli.store.manifests import G0Spec


def test_builtin_ring_teacher_samples_the_ring_with_heun_18():
    teacher = open_teacher("builtin:ring2d")
    assert teacher.dataset == "ring2d" and teacher.spec.precond_kwargs["sigma_data"] == 1.4
    z, _ = seeded_noise(range(2000), (2,))
    report = evaluate_vectors(edm_sampler(teacher.denoiser, z).float(), "ring2d")
    metrics = report["metrics"]
    assert metrics["mmd2"] < 0.005 and metrics["precision"] > 0.9
    assert metrics["modes_covered"] == 8 and metrics["mode_tv"] < 0.08


def test_g0_is_far_from_the_ring():
    teacher = open_teacher("builtin:ring2d")
    z, _ = seeded_noise(range(2000), (2,))
    with torch.no_grad():
        x = build_g0(G0Spec(sigma_init=2.5), teacher, "cpu")[0](z)
    metrics = evaluate_vectors(x, "ring2d", floor=False)["metrics"]
    assert metrics["mmd2"] > 0.3 and metrics["precision"] < 0.05


def test_teacher_training_is_deterministic_and_loadable(tmp_path):
    cfg = TeacherTrainConfig(
        dataset="ring2d",
        arch_kwargs={"hidden": 32, "depth": 2},
        sigma_data=1.4,
        iters=150,
        batch=128,
        device="cpu",
    )
    first = train_teacher(cfg, tmp_path / "a.safetensors")
    second = train_teacher(cfg, tmp_path / "b.safetensors")
    assert first == second
    loaded = load_denoiser(tmp_path / "a.safetensors")
    assert loaded.info["role"] == "teacher" and loaded.info["dataset"] == "ring2d"
    assert loaded.info["train_config"]["iters"] == 150
