"""Pictures (issue 32, item 6): curves start at iteration 0, where `--eval-every` now measures G0,
and sample grids carry captions in a margin of their own, the images' pixels unchanged."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_backtrack import At, crash, metrics

from conftest import backtracked_copy
from disback_cli.config import BacktrackConfig
from disback_cli.evaluation.plot import plot_runs
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.demo import _upscale, labelled_side_by_side, side_by_side
from disback_cli.store.images import grid, prompt_grid, upscale
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.metrics_log import read_metrics

RUN = dict(
    iters=30,
    interval=10,
    batch=64,
    save_every=10,
    log_every=10,
    eval_every=10,
    eval_samples=200,
    device="cpu",
)


@pytest.fixture(scope="module")
def whole(small_trajectory, tmp_path_factory):
    """An uninterrupted 30-iteration run evaluated every 10 iterations."""
    return backtracked_copy(small_trajectory, tmp_path_factory.mktemp("whole"), **RUN)


def test_a_fresh_run_measures_g0_at_iteration_0(whole):
    lines = read_metrics(backtrack_dir(whole, "default"))
    evaluated = [ln["iteration"] for ln in lines if "eval" in ln]
    assert evaluated == [0, 10, 20, 30]
    first = lines[0]
    assert first["iteration"] == 0 and first["seconds"] == 0.0 and "loss_g" not in first
    assert set(first["eval"]) == set(lines[-1]["eval"])  # the same metrics as every evaluation


@pytest.mark.parametrize("crash_at", [10, 20], ids=["before-any-save", "after-a-save"])
def test_a_resumed_run_logs_what_an_uninterrupted_one_does(
    whole, small_trajectory, tmp_path, crash_at
):
    """Crashed at 10 (no resume point yet: it restarts at 0 and keeps its line 0) or at 20
    (resumed from 10): either way iteration 0 is logged once, as in the uninterrupted run."""
    traj = tmp_path / "t"
    shutil.copytree(small_trajectory, traj)
    cfg = BacktrackConfig(**{**RUN, "save_every": 20}) if crash_at == 10 else BacktrackConfig(**RUN)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_backtrack(cfg, traj, reporter=At(crash_at, crash))
    assert metrics(backtrack_dir(traj, "default"))[0]["iteration"] == 0
    run_backtrack(cfg, traj)
    assert metrics(backtrack_dir(traj, "default")) == metrics(backtrack_dir(whole, "default"))


def test_the_curves_start_at_iteration_0(whole, tmp_path):
    summary = plot_runs([backtrack_dir(whole, "default")], tmp_path / "c.png")
    assert summary["metric"] == "mmd2"
    assert list(summary["eval_iterations"].values()) == [[0, 30]]
    assert (tmp_path / "c.png").stat().st_size > 0


# --- captions -------------------------------------------------------------------------------


def test_the_demo_grid_labels_each_panel_above_its_unchanged_pixels():
    rng = np.random.default_rng(0)
    grids = [grid(rng.integers(0, 256, (9, 6, 6, 1), dtype=np.uint8)) for _ in range(3)]
    plain = _upscale(side_by_side(grids), 4)
    labelled = labelled_side_by_side(grids, ["teacher", "G0", "distilled"])
    margin = labelled.shape[0] - plain.shape[0]
    assert margin > 0 and labelled.shape[1:] == plain.shape[1:]
    assert np.array_equal(labelled[margin:], plain)
    top = labelled[:margin, :, 0]
    assert (top < 128).any() and (top == 255).mean() > 0.8  # dark text on white
    width = grids[0].shape[1] * 4  # each label sits over its own panel
    for panel in range(3):
        left = panel * (width + 16)
        assert (top[:, left : left + width] < 128).any()


def test_a_prompt_grid_captions_its_rows_in_a_margin_on_the_left():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    plain = upscale(grid(images))
    assert np.array_equal(prompt_grid(images), plain)  # no prompts: the grid as before
    prompts = ["a red cat $5"] * 4 + ["a dog on a very long road " * 10] * 6
    captioned = prompt_grid(images, prompts)
    margin = captioned.shape[1] - plain.shape[1]
    assert margin > 0 and captioned.shape[0] == plain.shape[0] and captioned.shape[2] == 3
    assert np.array_equal(captioned[:, margin:], plain)
    text = captioned[:, :margin].min(axis=2) < 128
    row = plain.shape[0] // 3  # 4 columns: 3 rows, each with its caption
    assert all(text[r * row : (r + 1) * row].any() for r in range(3))


def test_without_matplotlib_grids_are_written_uncaptioned(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # its import now fails
    images = np.zeros((4, 8, 8, 1), np.uint8)
    assert np.array_equal(prompt_grid(images, ["a"] * 4), upscale(grid(images)))
    grids = [grid(images)] * 3
    assert np.array_equal(
        labelled_side_by_side(grids, ["a", "b", "c"]), _upscale(side_by_side(grids), 4)
    )


class Squash(torch.nn.Module):
    """A stand-in one-step generator of 8 x 8 RGB images: its noise, squashed into [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.denoiser = torch.nn.Identity()
        self.denoiser.data_shape, self.denoiser.label_dim = (3, 8, 8), 0

    def forward(self, z: torch.Tensor, **conditions) -> torch.Tensor:
        return torch.tanh(z)


def test_sample_grid_of_prompted_samples_is_captioned_beside_its_tiles(tmp_path):
    """`sample --grid` where each image has a prompt (what text-to-image families give through
    `prompts_of`; here a stand-in, to stay fast): the tiles of the PNGs written, exactly as
    without prompts, right of a caption margin."""
    from disback_cli.config import SampleConfig
    from disback_cli.models.family import ClassConditions
    from disback_cli.stages.sample import write_samples_of

    class Prompted(ClassConditions):
        def prompts_of(self, items):
            return [f"prompt {seed // 3}" for _, seed, _ in items]

    info = {"file": "squash", "sha256": "0" * 64, "weights": "ema"}
    out = tmp_path / "images"
    cfg = SampleConfig(n=6, batch=4, device="cpu")
    summary = write_samples_of(Squash(), info, cfg, Prompted(0), out, grid_out=True)
    listing = json.loads((out / "prompts.json").read_text())["images"]
    assert [e["prompt"] for e in listing] == ["prompt 0"] * 3 + ["prompt 1"] * 3
    picture = np.asarray(Image.open(summary["grid"]))
    images = np.stack([np.asarray(Image.open(out / e["file"])) for e in listing])
    plain = upscale(grid(images))
    margin = picture.shape[1] - plain.shape[1]
    assert margin > 0 and picture.shape[0] == plain.shape[0]
    assert np.array_equal(picture[:, margin:], plain)
    assert (picture[:, :margin].min(axis=2) < 128).any()  # the captions
