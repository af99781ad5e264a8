"""End to end on builtin:ring2d: both DisBack and the baseline must clearly beat G0."""

import pytest
import torch

from disback_cli.config import BacktrackConfig, RecordConfig, SampleConfig
from disback_cli.evaluation.ground_truth import evaluate_vectors
from disback_cli.method.generator import build_g0
from disback_cli.method.sampling import seeded_noise
from disback_cli.models.teachers import open_teacher
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.stages.sample import write_samples
from disback_cli.store.manifests import G0Spec, generator_file_of_run
from disback_cli.store.samples import read_samples


@pytest.fixture(scope="module")
def g0_metrics():
    z, _ = seeded_noise(range(2000), (2,))
    with torch.no_grad():
        x = build_g0(G0Spec(sigma_init=2.5), open_teacher("builtin:ring2d"), "cpu")[0](z)
    return evaluate_vectors(x, "ring2d", floor=False)["metrics"]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "t1"
    run_record(RecordConfig(teacher="builtin:ring2d", iters=600, nodes=6, device="cpu"), out)
    return out


@pytest.mark.parametrize("no_trajectory", [False, True], ids=["disback", "baseline"])
def test_distilled_generator_beats_g0_on_every_metric(trajectory, g0_metrics, no_trajectory):
    name = "baseline" if no_trajectory else "default"
    cfg = BacktrackConfig(iters=1500, interval=100, no_trajectory=no_trajectory, device="cpu")
    run_backtrack(cfg, trajectory, name)
    path, sha = generator_file_of_run(trajectory, name, "ema")
    write_samples(SampleConfig(n=2000, device="cpu"), path, trajectory / f"{name}.npz", sha)
    metrics = evaluate_vectors(read_samples(trajectory / f"{name}.npz")[0], "ring2d")["metrics"]
    assert g0_metrics["mmd2"] > 0.4 and metrics["mmd2"] < 0.08
    assert g0_metrics["sliced_w2"] > 0.6 and metrics["sliced_w2"] < 0.25
    assert g0_metrics["precision"] < 0.05 and metrics["precision"] > 0.35
    assert g0_metrics["modes_covered"] == 0 and metrics["modes_covered"] >= 7
    assert g0_metrics["mode_tv"] > 0.9 and metrics["mode_tv"] < 0.25
