"""DiffRatio (issue 19): the ratio objective and the generator gradient on two Gaussians, where
the optimal log ratio and its gradient are closed-form; the CLI end to end; bad --data refused;
best-of-K sampling with the ratio network as verifier."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_backtrack import At, crash
from torch import nn

from conftest import file_digests
from disback_cli.config import BacktrackConfig
from disback_cli.evaluation.ground_truth import training_evaluator
from disback_cli.method.generator import build_g0
from disback_cli.method.losses import DiffRatioLoss, VSDLoss
from disback_cli.method.noise import TrainingSigma
from disback_cli.method.ratio import ratio_step, score_difference
from disback_cli.models.conditioning import NO_CONDITIONS, Unconditional
from disback_cli.models.family import TeacherFamily
from disback_cli.models.ratio import build_ratio, ratio_spec_for
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.trajectory import open_trajectory
from disback_cli.store.images import encode_png, png_name
from disback_cli.store.layout import backtrack_dir

MEAN_DATA, MEAN_GEN, STD = torch.tensor([1.0, -0.5]), torch.tensor([-1.0, 0.5]), 0.5


class GaussianData:
    """Real data N(MEAN_DATA, STD^2 I) as a data source."""

    def draw(self, n, rng, device):
        return MEAN_DATA + STD * torch.randn(n, 2, generator=rng, device=device), NO_CONDITIONS


class GaussianGenerator(nn.Module):
    """A frozen generator of N(MEAN_GEN, STD^2 I)."""

    def forward(self, z, **cond):
        return MEAN_GEN + STD * z


def exact_log_ratio_gradient(sigma: float) -> torch.Tensor:
    """grad_x log p_sigma / q_sigma for two Gaussians of equal variance v = STD^2 + sigma^2:
    the log ratio is linear in x with gradient (mean_p - mean_q) / v."""
    return (MEAN_DATA - MEAN_GEN) / (STD**2 + sigma**2)


def test_the_ratio_network_learns_the_closed_form_log_ratio_gradient():
    torch.manual_seed(0)
    ratio = build_ratio(ratio_spec_for((2,), 0, 0.5, 64, 2))
    optimizer = torch.optim.Adam(ratio.parameters(), lr=5e-3)
    rng = torch.Generator().manual_seed(0)
    levels = TrainingSigma("lognormal", -0.5, 0.8)
    for _ in range(500):
        ratio_step(
            ratio,
            optimizer,
            GaussianGenerator(),
            (256, 2),
            Unconditional(),
            levels,
            rng,
            data=GaussianData(),
        )
    for sigma in (0.3, 0.6, 1.0):
        x = 0.5 * (MEAN_DATA + MEAN_GEN) + torch.randn(512, 2, generator=rng) * 0.4
        gap = score_difference(ratio, x, torch.full((512,), sigma), NO_CONDITIONS)
        learned = -gap.mean(dim=0) / sigma**2  # = mean grad d over the points
        exact = exact_log_ratio_gradient(sigma)
        cosine = torch.cosine_similarity(learned, exact, dim=0)
        assert cosine > 0.98 and abs(learned.norm() / exact.norm() - 1) < 0.2, (sigma, learned)


class ExactLogRatio(nn.Module):
    """d(x, sigma) = log p_sigma(x) - log q_sigma(x) for the two Gaussians, exactly."""

    spec = SimpleNamespace(sigma_data=0.5)  # read by the score weighting only

    def forward(self, x, sigma, class_labels=None):
        v = STD**2 + torch.as_tensor(sigma).reshape(-1, 1) ** 2
        return (
            -(x - MEAN_DATA).pow(2).sum(1, keepdim=True) / (2 * v)
            + (x - MEAN_GEN).pow(2).sum(1, keepdim=True) / (2 * v)
        ).flatten()


class GaussianDenoiser(nn.Module):
    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.mean = mean

    def forward(self, x, sigma, **cond):
        v = STD**2 + torch.as_tensor(sigma).reshape(-1, 1) ** 2
        return self.mean + STD**2 / v * (x - self.mean)


def test_with_the_exact_ratio_the_generator_gradient_is_vsds_with_the_exact_scores():
    gen = torch.Generator().manual_seed(3)
    x = (MEAN_GEN + STD * torch.randn(64, 2, generator=gen)).requires_grad_(True)
    sigma = torch.exp(torch.randn(64, generator=gen))
    noise = torch.randn(64, 2, generator=gen)
    ratio = DiffRatioLoss(-0.5, 1.0, "denoiser")(
        x, sigma, noise, ExactLogRatio(), None, NO_CONDITIONS
    )
    (grad_ratio,) = torch.autograd.grad(ratio.loss, x)
    vsd = VSDLoss(-0.5, 1.0)(
        x, sigma, noise, GaussianDenoiser(MEAN_GEN), GaussianDenoiser(MEAN_DATA), NO_CONDITIONS
    )
    (grad_vsd,) = torch.autograd.grad(vsd.loss, x)
    torch.testing.assert_close(grad_ratio, grad_vsd, rtol=1e-5, atol=1e-6)
    assert grad_ratio.abs().sum() > 0


# --- end to end ---------------------------------------------------------------------------------

RING = [
    "--loss",
    "diffratio",
    "--data",
    "builtin:ring2d",
    "--iters",
    "20",
    "--batch",
    "64",
    "--log-every",
    "10",
    "--save-every",
    "10",
    "--eval-every",
    "10",
    "--set",
    "eval_samples=200",
    "--device",
    "cpu",
]


def test_diffratio_backtracks_on_the_ring_resumes_bit_for_bit_and_verifies(
    cli, tmp_path, small_trajectory
):
    traj = tmp_path / "t"
    shutil.copytree(small_trajectory, traj)
    result = cli("backtrack", "-T", traj, *RING, "--name", "whole", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["config"]["no_trajectory"] and summary["config_sources"]["no_trajectory"] == (
        "loss diffratio"
    )
    run = backtrack_dir(traj, "whole")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["source"] == "builtin:ring2d" and manifest["ratio"]["file"].endswith(
        "ratio-00000020.safetensors"
    )
    cfg = BacktrackConfig(
        loss="diffratio",
        data="builtin:ring2d",
        iters=20,
        batch=64,
        log_every=10,
        save_every=10,
        eval_every=10,
        eval_samples=200,
        device="cpu",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(cfg, traj, "broken", reporter=At(20, crash))
    run_backtrack(cfg, traj, "broken")
    assert file_digests(run) == file_digests(backtrack_dir(traj, "broken"))
    plain = tmp_path / "k1.npz"
    assert cli("sample", "-T", traj, "--name", "whole", "-n", "32", "--out", plain).code == 0
    best = tmp_path / "k4.npz"

    def best_of_four(out) -> int:
        args = ["-n", "32", "--best-of", "4", "--verifier", run, "--out", out]
        return cli("sample", "-T", traj, "--name", "whole", *args).code

    assert best_of_four(best) == 0
    again = tmp_path / "k4-again.npz"
    assert best_of_four(again) == 0
    k1, k4 = np.load(plain)["samples"], np.load(best)["samples"]
    assert np.array_equal(k4, np.load(again)["samples"])  # deterministic per seed
    assert not np.array_equal(k1, k4) and (k1 == k4).all(axis=1).any()  # some seeds keep #0
    meta = json.loads(str(np.load(best)["meta"]))
    assert meta["best_of"] == 4 and meta["verifier_sha256"] == manifest["ratio"]["sha256"]
    assert meta["best_of_rule"] == "resample"
    unpaired = cli(
        "sample",
        "-T",
        traj,
        "--name",
        "whole",
        "-n",
        "2",
        "--best-of",
        "4",
        "--out",
        tmp_path / "x.npz",
    )
    assert unpaired.code == 2 and "--verifier" in unpaired.stderr


@pytest.fixture(scope="module")
def digits_path(tmp_path_factory, cli_module):
    traj = tmp_path_factory.mktemp("dr") / "d"
    assert (
        cli_module(
            "record",
            "--teacher",
            "builtin:digits",
            "--out",
            traj,
            "--iters",
            "2",
            "--nodes",
            "1",
            "--batch",
            "64",
        ).code
        == 0
    )
    return traj


def test_at_an_edm_size_teachers_defaults_the_ratio_network_still_learns(
    tmp_path, small_trajectory, monkeypatch
):
    """The ratio network trains at a from-scratch rate, not the fake score's 1e-5 for EDM-size
    teachers: on the ring the generator then ends far closer to the data than G0 is. The same
    run with the ratio at 1e-5 (the rate before --lr-ratio) does not get there. Compared: the
    mean MMD² of the evaluations over the second half of the run, at DiffRatio's other
    defaults (five ratio steps, the score weighting)."""
    monkeypatch.setattr(TeacherFamily, "size_class", lambda self, teacher: "edm")
    traj = tmp_path / "t"
    shutil.copytree(small_trajectory, traj)
    # The generator's own rate and EMA are set: what is under test is the ratio network's.
    run = dict(loss="diffratio", data="builtin:ring2d", lr_g=1e-4, ema_halflife_kimg=10.0)
    run.update(iters=400, batch=256, log_every=50, save_every=400, device="cpu")
    run.update(eval_every=100, eval_samples=1000)

    def final_mmd2(name, **rates):
        manifest = run_backtrack(BacktrackConfig(**run, **rates), traj, name)
        lines = (backtrack_dir(traj, name) / "metrics.jsonl").read_text().splitlines()
        evals = [json.loads(ln) for ln in lines if '"eval"' in ln]
        late = [line["eval"]["mmd2"] for line in evals if line["iteration"] >= 200]
        return manifest, sum(late) / len(late)

    manifest, learned = final_mmd2("default")
    assert manifest.config.lr_ratio == 1e-3 and manifest.config.lr_fake is None
    _, teacher = open_trajectory(traj, None, torch.device("cpu"))
    g0, _ = build_g0(manifest.g0, teacher, torch.device("cpu"))
    evaluate = training_evaluator("ring2d", 1000, (2,), Unconditional(), "cpu", 256)
    start = evaluate(g0.eval())["mmd2"]
    _, slow = final_mmd2("old-rate", lr_ratio=1e-5)
    assert learned < 0.3 * start and learned < 0.6 * slow, (start, learned, slow)


def test_diffratio_learns_from_digits_with_their_labels(cli, tmp_path, digits_path):
    traj = tmp_path / "d"
    shutil.copytree(digits_path, traj)
    result = cli(
        "backtrack",
        "-T",
        traj,
        "--loss",
        "diffratio",
        "--data",
        "builtin:digits",
        "--iters",
        "4",
        "--batch",
        "8",
        "--log-every",
        "2",
        "--save-every",
        "2",
        "--json",
    )
    assert result.code == 0, result.stderr
    line = json.loads(result.stdout)["last_metrics"]
    assert np.isfinite(line["loss_g"]) and line["loss_fake"] > 0


def write_folder(root, images: np.ndarray, labels: list | None) -> None:
    for i, image in enumerate(images):
        (root / png_name(i)).parent.mkdir(parents=True, exist_ok=True)
        (root / png_name(i)).write_bytes(encode_png(image))
    if labels is not None:
        entries = [[png_name(i), y] for i, y in enumerate(labels)]
        (root / "dataset.json").write_text(json.dumps({"labels": entries}))


@pytest.mark.parametrize(
    "case",
    [
        "none",
        "missing",
        "shape",
        "no-labels",
        "bad-label",
        "unreadable",
        "unreadable-last",
        "size-last",
        "other-loss",
    ],
)
def test_bad_data_is_refused_in_one_line_with_nothing_written(case, cli, tmp_path, digits_path):
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 1), dtype=np.uint8)
    folder = tmp_path / "data"
    folder.mkdir()
    data, code, phrase = str(folder), 2, None
    if case == "none":
        data, phrase = None, "--data"
    elif case == "missing":
        data, phrase = str(tmp_path / "nowhere"), "no such file"
    elif case == "shape":
        data, phrase = "builtin:ring2d", "shape"
    elif case == "no-labels":
        write_folder(folder, images, None)
        phrase = "dataset.json"
    elif case == "bad-label":
        write_folder(folder, images, [0, 1, 2, 3, 4, 10])
        phrase = "no label in 0..9"
    elif case == "unreadable":
        write_folder(folder, images, [0, 1, 2, 3, 4, 5])
        (folder / png_name(0)).write_bytes(b"not a png")
        code, phrase = 1, "not a readable image"
    elif case == "unreadable-last":  # found before the run starts, not at its first draw of it
        write_folder(folder, images, [0, 1, 2, 3, 4, 5])
        (folder / png_name(5)).write_bytes(b"not a png")
        code, phrase = 1, "not a readable image"
    elif case == "size-last":
        write_folder(folder, images, [0, 1, 2, 3, 4, 5])
        (folder / png_name(5)).write_bytes(encode_png(np.zeros((16, 16, 1), dtype=np.uint8)))
        phrase = "its size differs from the first image's"
    args = ["backtrack", "-T", digits_path, "--iters", "2", "--batch", "4", "--name", case]
    args += ["--loss", "vsd" if case == "other-loss" else "diffratio"]
    if case == "other-loss":
        data, phrase = "builtin:digits", "--loss diffratio"
    if data is not None:
        args += ["--data", data]
    result = cli(*args)
    assert result.code == code and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: ") and phrase in result.stderr
    assert not backtrack_dir(digits_path, case).exists()
