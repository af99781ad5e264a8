"""`disback export --format onnx`: onnxruntime draws what the PyTorch generator draws (a tiny
class-conditional EDM U-Net, dynamic batch), the card's snippet runs, and what it cannot write is
refused in one line before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

import onnx
import onnxruntime as ort
from edm_fixtures import ARCHS, tiny_network, write_edm_snapshot

from disback_cli.config.export import ExportConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.export import ExportSource, onnx_graph
from disback_cli.export.onnx_graph import OnnxExport
from disback_cli.method.generator import OneStepGenerator, load_generator
from disback_cli.method.sampling import seeded_noise
from disback_cli.models.conditioning import condition_source
from disback_cli.models.networks import NetworkSpec
from disback_cli.runtime.reporting import SilentReporter
from disback_cli.store.export_folder import ExportFolder
from disback_cli.store.images import to_uint8
from disback_cli.store.manifests import generator_file_of_run

CLASSES = 10
SHAPE = (3, 8, 8)


def edm_source() -> ExportSource:
    """A class-conditional DDPM++ generator; the ONNX exporter reads only the generator and its
    network spec, so the run's manifests are left out."""
    net, _ = tiny_network("ddpmpp", "edm", label_dim=CLASSES, augment_dim=9)
    spec = NetworkSpec(
        arch="SongUNet",
        arch_kwargs={**ARCHS["ddpmpp"][1], "augment_dim": 9},
        precond="edm",
        data_shape=SHAPE,
        label_dim=CLASSES,
    )
    generator = OneStepGenerator(net, 2.5, input_scale=3.0).eval()  # two constants in the graph
    return ExportSource(generator, spec, {}, None, None, None, None)


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def edm_run(tmp_path_factory, cli_module):
    """A finished backtrack run distilled from a tiny class-conditional EDM pickle."""
    root = tmp_path_factory.mktemp("edm-run")
    net, init_kwargs = tiny_network("ddpmpp", "edm", label_dim=CLASSES, augment_dim=9)
    pkl = write_edm_snapshot(root / "tiny-edm.pkl", net, init_kwargs)
    traj, quick = root / "t", ["--batch", "2", "--device", "cpu"]
    for args in (
        ["record", "--teacher", pkl, "--out", traj, "--iters", "2", "--nodes", "1", *quick],
        ["backtrack", "-T", traj, "--iters", "2", "--save-every", "0", *quick],
    ):
        result = cli_module(*args)
        assert result.code == 0, (args, result.stderr)
    return traj


@pytest.fixture(scope="module")
def exported(edm_run, tmp_path_factory, cli_module):
    """The run exported once through `disback export --format onnx`: its generator (PyTorch),
    the export folder and the card's usage (snippet and facts)."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    result = cli_module("export", "-T", edm_run, "--format", "onnx", "--out", out, "--json")
    assert result.code == 0, result.stderr
    path, sha = generator_file_of_run(edm_run, "default", "ema")
    generator, _ = load_generator(path, torch.device("cpu"), sha)
    return generator, out, json.loads(result.stdout)["card"]["usage"]


def test_onnxruntime_draws_what_the_generator_draws_at_any_batch(exported):
    generator, out, _ = exported
    z, cond = seeded_noise(range(8), SHAPE, condition_source(CLASSES))
    with torch.no_grad():
        expected = generator(z, **cond).numpy()
    graph = session(out / "generator.onnx")
    labels = cond["class_labels"].numpy()
    got = np.concatenate(
        [
            graph.run(["x"], {"z": z[rows].numpy(), "class_labels": labels[rows]})[0]
            for rows in (slice(0, 3), slice(3, 8))  # batches of 3 and 5
        ]
    )
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    onnx.checker.check_model(str(out / "generator.onnx"), full_check=True)


def test_facts_describe_the_file_and_the_snippet_runs(exported, monkeypatch):
    generator, out, usage = exported
    data = (out / "generator.onnx").read_bytes()
    facts = usage
    assert facts["sha256"] == hashlib.sha256(data).hexdigest() and facts["bytes"] == len(data)
    assert facts["opset"] == 18 and facts["dtype"] == "fp32"
    assert facts["inputs"] == {"z": ["batch", *SHAPE], "class_labels": ["batch", CLASSES]}
    assert facts["outputs"] == {"x": ["batch", *SHAPE]}
    constants = {"sigma_init": generator.sigma_init, "input_scale": generator.input_scale}
    assert facts["fixed_in_graph"] == constants
    assert json.loads(json.dumps(facts)) == facts
    assert b"precond.py" not in data  # no stack traces naming this machine's files
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(usage["snippet"], scope)  # the card's snippet, as a user would run it
    z, labels = torch.from_numpy(scope["z"]), torch.from_numpy(scope["inputs"]["class_labels"])
    with torch.no_grad():
        expected = generator(z, class_labels=labels)
    assert np.abs(scope["x"] - expected.numpy()).max() <= 1e-4 * expected.abs().max().item()
    assert scope["images"].shape == (16, 8, 8, 3) and scope["images"].dtype == np.uint8


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype="fp16"), "--format onnx writes float32 graphs only; drop --dtype fp16"),
        (dict(dtype="bf16"), "--format onnx writes float32 graphs only; drop --dtype bf16"),
        (dict(pipeline=True), "--pipeline is for --format diffusers"),
    ],
    ids=["fp16", "bf16", "pipeline"],
)
def test_options_it_cannot_honour_are_refused(options, message):
    with pytest.raises(ConfigError) as refused:
        OnnxExport().check(ExportConfig(format="onnx", **options), edm_source())
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_without_onnx_it_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    with pytest.raises(ConfigError) as refused:
        OnnxExport().check(ExportConfig(format="onnx"), edm_source())
    assert str(refused.value) == '--format onnx needs the onnx extra: pip install -e ".[onnx]"'


def test_a_generator_beyond_one_protobuf_is_refused_before_writing(monkeypatch):
    monkeypatch.setattr(onnx_graph, "MAX_PROTOBUF", onnx_graph.GRAPH_MARGIN)
    with pytest.raises(DisbackError) as refused:
        OnnxExport().check(ExportConfig(format="onnx"), edm_source())
    assert "more than the 2 GiB one ONNX file holds" in str(refused.value)
    assert "\n" not in str(refused.value)


class Branchy(torch.nn.Module):
    """A denoiser whose control flow depends on its input, which no graph can hold."""

    def forward(self, x, sigma, class_labels=None):
        return x if x.sum() > 0 else -x


def test_a_network_that_does_not_trace_is_refused_in_one_line(tmp_path):
    spec = NetworkSpec(arch="mlp", data_shape=(2,))
    source = ExportSource(OneStepGenerator(Branchy(), 2.5), spec, {}, None, None, None, None)
    with pytest.raises(DisbackError) as refused:
        OnnxExport().write(
            ExportConfig(format="onnx"), source, ExportFolder(tmp_path, False), SilentReporter()
        )
    assert str(refused.value).startswith("the generator does not convert to ONNX: ")
    assert "\\n" not in str(refused.value) and not (tmp_path / "generator.onnx").exists()


def test_cli_export_draws_what_disback_sample_draws(edm_run, exported, tmp_path, cli):
    _, out, _ = exported
    assert sorted(os.listdir(out)) == [".disback-export.json", "README.md", "generator.onnx"]
    assert "InferenceSession" in (out / "README.md").read_text()
    samples = tmp_path / "s.npz"
    result = cli("sample", "-T", edm_run, "--seeds", "0-7", "--format", "npz", "--out", samples)
    assert result.code == 0, result.stderr
    drawn = np.load(samples)
    z, cond = seeded_noise(range(8), SHAPE, condition_source(CLASSES))
    labels = cond["class_labels"].numpy()
    assert np.array_equal(labels.argmax(1), drawn["labels"])
    x = session(out / "generator.onnx").run(["x"], {"z": z.numpy(), "class_labels": labels})[0]
    difference = np.abs(to_uint8(torch.from_numpy(x)).astype(int) - drawn["images"])
    assert difference.max() <= 1 and (difference == 0).mean() > 0.99  # but a level's edge


def test_cli_refuses_fp16_in_one_line_and_writes_nothing(edm_run, tmp_path, cli):
    out = tmp_path / "onnx"
    result = cli("export", "-T", edm_run, "--format", "onnx", "--dtype", "fp16", "--out", out)
    assert result.code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "drop --dtype fp16" in result.stderr and not out.exists()
