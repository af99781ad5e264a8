"""The adversarial family (`method/adversarial.py`): DMD2's classifier head, SiDA's shared
encoder, f-distill's weights and the learning-rate warm-up. Each formula against the reference
code's, written out here; then what a run does with them on the ring (no-op at weight 0, exact
resume, 2 processes, where gradients go, refusals)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from edm_fixtures import tiny_network
from safetensors.torch import load_file

from conftest import checkout_env, launch, run_cli
from disback_cli.config import BacktrackConfig
from disback_cli.method.adversarial import (
    F_DIVERGENCES,
    DMD2Classifier,
    SiDAEncoder,
    dmd2_discriminator_loss,
    dmd2_generator_loss,
    f_divergence_weights,
    sida_discriminator_loss,
    sida_generator_loss,
)
from disback_cli.models.networks.heads import ClassifierHead
from disback_cli.models.teachers import open_teacher
from disback_cli.runtime.parallel import Execution
from disback_cli.stages.lifecycle import warm_up

CPU = torch.device("cpu")
EX = Execution(CPU)
REAL = torch.tensor([2.0, -1.0, 0.5, 30.0])
FAKE = torch.tensor([-3.0, 0.25, 1.5, -40.0])


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-x))


# -- the formulas ---------------------------------------------------------------------------


def test_dmd2_losses_are_dmd2s():
    """edm_guidance.py: softplus(pred_realism_on_fake) + softplus(-pred_realism_on_real), means;
    the generator's softplus(-logits).mean()."""
    expected = -log_sigmoid(-FAKE).mean() + -log_sigmoid(REAL).mean()
    assert dmd2_discriminator_loss(REAL, FAKE) == pytest.approx(expected.item(), rel=1e-6)
    assert dmd2_generator_loss(FAKE) == pytest.approx(-log_sigmoid(FAKE).mean().item(), rel=1e-6)


def test_sida_losses_are_sidas():
    """sida_loss.py: mean(lambda) x (BCE(real, 1) + BCE(fake, 0)) / 2, each over every location;
    the generator's BCE(clamp(logit, -10, 10), 1) per sample over its locations / weight_factor."""
    real, fake = REAL.reshape(2, 1, 2), FAKE.reshape(2, 1, 2)
    weight = torch.tensor([3.0, 5.0])
    bce_real = -log_sigmoid(real).mean()
    bce_fake = -log_sigmoid(-fake).mean()
    expected = 4.0 * (bce_real + bce_fake) / 2
    assert sida_discriminator_loss(real, fake, weight) == pytest.approx(expected.item(), rel=1e-6)
    scale = torch.tensor([0.5, 2.0])
    per_sample = -log_sigmoid(fake.clamp(-10, 10)).flatten(1).mean(dim=1)
    assert sida_generator_loss(fake, scale) == pytest.approx(
        (per_sample / scale).mean().item(), rel=1e-6
    )


HAND_WRITTEN = {  # f-distill's Table 1: h(r) = f''(r) r^2
    "rkl": lambda r: 1.0,
    "kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "sh": lambda r: math.sqrt(r),
    "jf": lambda r: 1 + r,
}


@pytest.mark.parametrize("divergence", list(F_DIVERGENCES))
def test_f_divergence_weights_are_h_of_the_clipped_ratio_over_their_mean(divergence):
    logits = torch.tensor([-50.0, -1.0, 0.0, 1.0, 2.5, 50.0])
    ratios = [min(max(math.exp(max(min(v, 10.0), -10.0)), 0.1), 20.0) for v in logits.tolist()]
    assert ratios[0] == 0.1 and ratios[-1] == 20.0  # both clips are exercised
    h = [HAND_WRITTEN[divergence](r) for r in ratios]
    expected = [value / (sum(h) / len(h) + 1e-6) for value in h]
    got = f_divergence_weights(logits, divergence, EX)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_warm_up_is_linear_in_the_iteration_and_a_function_of_it_alone():
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([{"params": [weight]}, {"params": [], "lr": 4e-3}], lr=1e-3)
    rates = []
    for step in (1, 2, 5, 9):
        warm_up([optimizer], step, 4)
        rates += [group["lr"] for group in optimizer.param_groups]
    assert rates == pytest.approx([2.5e-4, 1e-3, 5e-4, 2e-3, 1e-3, 4e-3, 1e-3, 4e-3])
    fresh = torch.optim.Adam([weight], lr=1e-3)  # a resumed run starts from the config's rate
    warm_up([fresh], 2, 4)
    assert fresh.param_groups[0]["lr"] == pytest.approx(5e-4)
    warm_up([fresh], 3, 0)  # off: untouched
    assert fresh.param_groups[0]["lr"] == pytest.approx(5e-4)


# -- the head and the features it reads -----------------------------------------------------


def test_the_head_is_dmd2s_layer_for_layer_at_8x8_and_reduces_any_map():
    head = ClassifierHead((256, 8, 8))
    convs = [m for m in head.layers if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [
        ((4, 4), (2, 2), (1, 1)),
        ((4, 4), (4, 4), (0, 0)),
        ((1, 1), (1, 1), (0, 0)),
    ]
    assert [m.num_groups for m in head.layers if isinstance(m, torch.nn.GroupNorm)] == [32, 32]
    narrow = ClassifierHead((32, 4, 4)).layers  # groups of 8 channels, not 1
    assert [m.num_groups for m in narrow if isinstance(m, torch.nn.GroupNorm)] == [4]


def test_a_narrow_heads_logits_depend_on_its_input():
    """At a 1 x 1 map a GroupNorm group of one channel outputs its bias alone: every input
    would get the same logit (the head built with 32 groups of 32 channels did)."""
    logits = ClassifierHead((32, 4, 4))(torch.randn(8, 32, 4, 4))
    assert logits.std() > 1e-3
    assert (
        len([m for m in ClassifierHead((32, 32, 32)).layers if isinstance(m, torch.nn.Conv2d)]) == 5
    )
    for shape in ((24, 8, 8), (16, 5, 5), (8, 2, 2), (16,)):
        logits = ClassifierHead(shape)(torch.randn(3, *shape))
        assert logits.shape == (3,) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_features_are_the_forward_pass_stopped_at_the_lowest_resolution(arch):
    """`features` equals what the full forward pass computes at the encoder's last block and
    after the middle blocks (read with hooks), with labels."""
    net = tiny_network(arch, "edm", label_dim=3)[0]
    raw = net.model
    seen = {}
    last_encoder = list(raw.enc.values())[-1]
    middle = next(block for name, block in raw.dec.items() if name.endswith("_in1"))
    last_encoder.register_forward_hook(lambda m, i, o: seen.setdefault("encoder", o))
    middle.register_forward_hook(lambda m, i, o: seen.setdefault("middle", o))
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 4.0])
    labels = torch.eye(3)[[0, 2]]
    net(x, sigma, class_labels=labels)
    for where in ("encoder", "middle"):
        got = net.features(x, sigma, where, class_labels=labels)
        assert torch.equal(got, seen[where]), where


# -- on the ring ----------------------------------------------------------------------------

RUN = ["--iters", "20", "--interval", "5", "--batch", "32", "--log-every", "5", "--device", "cpu"]
RING = ["--data", "builtin:ring2d"]


@pytest.fixture(scope="module")
def ring(small_trajectory, tmp_path_factory):
    copy = tmp_path_factory.mktemp("adversarial") / "t"
    shutil.copytree(small_trajectory, copy)
    return copy


def backtrack(trajectory, name, *args):
    result = run_cli("backtrack", "-T", trajectory, "--name", name, "--quiet", *RUN, *args)
    assert result.code == 0, result.stderr
    return trajectory / "backtrack" / name


def weights(run, kind="generator", step=20):
    return load_file(run / "checkpoints" / f"{kind}-{step:08d}.safetensors")


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize(
    ("loss", "adversary"), [("vsd", "dmd2"), ("sid", "sida")], ids=["dmd2", "sida"]
)
def test_at_weight_zero_a_discriminator_changes_nothing(ring, loss, adversary):
    """Bit for bit today's run: the term's draws come from a stream of its own, and a weight of
    0 adds exact zeros (the ring's MLP has no dropout, whose draws would differ)."""
    plain = backtrack(ring, f"plain-{loss}", "--loss", loss, "--save-every", "20")
    adversarial = ("--loss", loss, "--adversary", adversary, *RING, "--save-every", "20")
    zero = ("--gan-weight-g", "0", "--gan-weight-d", "0")
    silent = backtrack(ring, f"zero-{adversary}", *adversarial, *zero)
    for kind in ("generator", "generator-ema"):
        assert_equal_tensors(weights(plain, kind), weights(silent, kind))
    loud = backtrack(ring, f"loud-{adversary}", *adversarial)
    first = "model.layers.0.weight"
    assert not torch.equal(weights(plain)[first], weights(loud)[first])


def test_a_resume_with_the_head_warm_up_and_f_distill_equals_an_uninterrupted_run(ring):
    """Stopped at iteration 10 (inside the warm-up, after two target switches) and extended to
    20: generator, EMA, head and every logged value as one run of 20; the head was never
    re-initialised at a switch (its Adam step count is the run's)."""
    flags = ("--adversary", "dmd2", *RING, "--f-divergence", "js", "--warmup", "15")
    whole = backtrack(ring, "whole", *flags, "--save-every", "10")
    parts = backtrack(ring, "parts", *flags, "--save-every", "10", "--iters", "10")
    parts = backtrack(ring, "parts", *flags, "--save-every", "10")
    for kind in ("generator", "generator-ema", "head"):
        assert_equal_tensors(weights(whole, kind), weights(parts, kind))
    assert (whole / "metrics.jsonl").read_text().count("ratio_weight_std") == 4
    strip = lambda run: [  # noqa: E731
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert strip(whole) == strip(parts)
    state = load_file(whole / "checkpoints" / "state-00000020.safetensors")
    steps = [key for key in state if key.startswith("optim.fake.") and key.endswith(".step")]
    last = max(steps, key=lambda key: int(key.split(".")[2]))  # the head's last parameter
    assert state[last].item() == 20
    samples = whole / "samples.npz"  # the generator leaves through `sample` as any other
    result = run_cli("sample", "-T", ring, "--name", "whole", "-n", "8", "--out", samples)
    assert result.code == 0 and np.load(samples)["samples"].shape == (8, 2), result.stderr
    manifest = json.loads((whole / "manifest.json").read_text())
    head = manifest["head"]
    assert head["file"] == "checkpoints/head-00000020.safetensors"
    assert head["sha256"] == hashlib.sha256((whole / head["file"]).read_bytes()).hexdigest()
    assert manifest["data"]["source"] == "builtin:ring2d"


def test_the_head_starts_from_the_seed_on_and_off_the_path(small_trajectory):
    """The head is initialised from the run's seed alone, whatever the fake score starts from
    (node N on the path, the teacher with --no-trajectory)."""
    teacher = open_teacher("builtin:ring2d", CPU)
    heads = []
    for no_trajectory, seed in ((False, 3), (True, 3), (False, 4)):
        cfg = BacktrackConfig(
            adversary="dmd2",
            data="builtin:ring2d",
            head_features="hidden",
            seed=seed,
            gan_weight_g=1.0,
            gan_weight_d=1.0,
            gan_max_level=1000,
            no_trajectory=no_trajectory,
        )
        fake = copy.deepcopy(teacher.denoiser)
        if no_trajectory:  # another starting point of the fake score
            with torch.no_grad():
                for p in fake.parameters():
                    p.add_(1.0)
        adversary = DMD2Classifier(cfg)
        adversary.open_inputs(cfg, teacher)
        heads.append(adversary.attach(fake, fake, cfg, EX)[1].state_dict())
    assert_equal_tensors(heads[0], heads[1])
    assert not torch.equal(heads[0]["layers.0.weight"], heads[2]["layers.0.weight"])


def test_the_discriminator_trains_fake_and_head_and_the_generator_term_only_the_generator():
    """The discriminator's loss gives gradients to the fake score and the head, none to the
    generator (its samples are detached); the generator's term gives the sample a gradient and
    the fake score's and head's weights none (frozen for it, as DMD2 does)."""
    teacher = open_teacher("builtin:ring2d", CPU)
    cfg = BacktrackConfig(
        adversary="dmd2",
        data="builtin:ring2d",
        head_features="hidden",
        gan_weight_g=1.0,
        gan_weight_d=1.0,
        gan_max_level=1000,
    )
    fake, target = copy.deepcopy(teacher.denoiser), copy.deepcopy(teacher.denoiser)
    fake.requires_grad_(True)
    target.requires_grad_(True)  # were a target ever reached, it would get a gradient
    adversary = DMD2Classifier(cfg)
    adversary.open_inputs(cfg, teacher)
    head = adversary.attach(fake, fake, cfg, EX)[1]
    adversary.seed_step(1)
    generator = torch.nn.Linear(2, 2)
    x0 = generator(torch.randn(16, 2))
    adversary.discriminator_loss(x0, {}, None, None).backward()
    read = list(fake.model.layers[:-1].parameters())  # the output layer is past the features
    assert all(p.grad is not None for p in (*read, *head.parameters()))
    assert all(p.grad is None for p in (*generator.parameters(), *target.parameters()))
    fake.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    x = x0.detach().requires_grad_(True)
    adversary.generator_term(x, None, None, {}, None).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in (*fake.parameters(), *head.parameters()))
    assert all(p.grad is None for p in target.parameters())


def test_sida_reads_the_fake_scores_encoder_and_noises_real_data_as_its_dsm_sample():
    net = tiny_network("ddpmpp", "edm", channels=1)[0]
    cfg = BacktrackConfig(
        loss="sid", adversary="sida", data="builtin:digits", head_features="encoder"
    )
    sida = SiDAEncoder(cfg)
    assert sida.attach(net, net, cfg, EX) is net  # nothing of its own to train or save
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    expected = net.features(x, sigma, "encoder").mean(dim=1, keepdim=True)
    assert torch.equal(sida.logits(x, sigma, {}), expected)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--adversary", "dmd2"), "--adversary dmd2 learns from real data: give --data"),
        (("--adversary", "dmd2", "--data", "builtin:digits"), "builtin:digits"),
        (("--adversary", "dmd2", "--data", "nowhere/data.zip"), "nowhere/data.zip"),
        (("--f-divergence", "kl"), "--f-divergence is for --adversary dmd2"),
        (("--adversary", "sida", *RING), "--adversary sida is SiD's adversarial form"),
        (("--adversary", "dmd2", *RING, "--loss", "sid", "--f-divergence", "kl"), "not --loss sid"),
        (("--adversary", "dmd2", *RING, "--head-features", "middle"), "offers hidden"),
        (("--gan-weight-g", "1"), "--gan-weight-g is for --adversary dmd2 or --adversary sida"),
        (("--loss", "diffratio", "--adversary", "dmd2", *RING), "diffratio's ratio network"),
        (("--warm-fake",), "--warm-fake is for --no-trajectory"),
        (("--loss", "diffratio", *RING, "--warm-fake"), "--warm-fake is for score distillation"),
    ],
)
def test_bad_adversarial_settings_are_one_line_and_write_nothing(ring, flags, message):
    result = run_cli("backtrack", "-T", ring, "--name", "refused", *RUN, *flags)
    assert result.code != 0
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (ring / "backtrack" / "refused").exists()


def test_two_processes_equal_one_with_the_head_and_f_distill(ring, tmp_path):
    """Data, noise and f-distill's batch mean drawn or taken over the global batch."""
    flags = [*RUN, "--adversary", "dmd2", *RING, "--f-divergence", "kl", "--save-every", "20"]
    env = checkout_env(OMP_NUM_THREADS="1")
    one = launch(tmp_path, "backtrack", "-T", ring, "--name", "one", *flags, env=env)
    two = launch(
        tmp_path,
        "backtrack",
        "-T",
        ring,
        "--name",
        "two",
        *flags,
        "--batch",
        "16",
        processes=2,
        env=env,
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = (weights(ring / "backtrack" / name) for name in ("one", "two"))
    scale = max(value.abs().max().item() for value in a.values())
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5 * scale
