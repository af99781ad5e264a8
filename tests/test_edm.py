"""EDM teachers: pickles read without running their code, strict loading, exact outputs."""

import itertools
import os
import pickle

import pytest
import torch
from edm_fixtures import ARCHS, edm_pickle_bytes, tiny_network, write_edm_snapshot

from disback_cli.errors import DisbackError
from disback_cli.models.denoiser_files import load_denoiser
from disback_cli.models.edm_pickle import read_edm_pickle
from disback_cli.models.teachers import describe_teacher, load_teacher, open_teacher

SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 5.0, 20.0, 80.0])


def outputs(denoiser, label_dim, seed=1):
    rng = torch.Generator().manual_seed(seed)
    x = torch.randn(len(SIGMAS), 3, 8, 8, generator=rng) * SIGMAS.reshape(-1, 1, 1, 1)
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(len(SIGMAS)) % label_dim, label_dim)
    with torch.no_grad():
        return denoiser(x, SIGMAS, labels.float() if labels is not None else None)


@pytest.mark.parametrize(("arch", "precond"), list(itertools.product(ARCHS, ["edm", "vp", "ve"])))
def test_every_architecture_and_preconditioning_loads_strictly_with_equal_outputs(
    tmp_path, arch, precond
):
    net, init_kwargs = tiny_network(arch, precond, label_dim=10, augment_dim=9)
    path = write_edm_snapshot(tmp_path / "net.pkl", net, init_kwargs)
    teacher = open_teacher(str(path))
    assert teacher.spec.arch == ARCHS[arch][0] and teacher.spec.precond == precond
    assert set(teacher.denoiser.state_dict()) == set(net.state_dict())
    difference = (outputs(teacher.denoiser, 10) - outputs(net, 10)).abs().max().item()
    assert difference <= 1e-5
    assert "model.map_augment.weight" in teacher.denoiser.state_dict()  # present, fed nothing


def test_python_api_load_teacher_returns_a_frozen_denoiser_module(tmp_path):
    net, init_kwargs = tiny_network("ncsnpp", "edm", label_dim=10)
    module = load_teacher(str(write_edm_snapshot(tmp_path / "n.pkl", net, init_kwargs)))
    assert isinstance(module, torch.nn.Module) and not module.training
    assert not any(p.requires_grad for p in module.parameters())
    assert torch.equal(outputs(module, 10), outputs(net, 10))


def test_bare_network_pickle_and_unconditional_model(tmp_path):
    net, init_kwargs = tiny_network("ddpmpp", "edm")
    path = tmp_path / "bare.pkl"
    path.write_bytes(edm_pickle_bytes(net, net, init_kwargs))
    teacher = open_teacher(str(path))
    assert teacher.spec.label_dim == 0
    assert torch.equal(outputs(teacher.denoiser, 0), outputs(net, 0))


def test_pickle_records_keep_edm_kwargs_and_source_hash(tmp_path):
    net, init_kwargs = tiny_network("ncsnpp", "ve", label_dim=10)
    edm = read_edm_pickle(write_edm_snapshot(tmp_path / "n.pkl", net, init_kwargs))
    assert edm.class_name == "VEPrecond" and edm.model_type == "SongUNet"
    assert edm.spec.arch_kwargs["resample_filter"] == [1, 3, 3, 1]
    assert edm.spec.data_shape == (3, 8, 8) and len(edm.module_src_sha256) == 64


def test_inspect_and_convert_round_trip(tmp_path, cli):
    net, init_kwargs = tiny_network("adm", "vp", label_dim=10)
    pkl = write_edm_snapshot(tmp_path / "adm.pkl", net, init_kwargs)
    result = cli("teacher", "inspect", pkl, "--json")
    assert result.code == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["architecture"] == "DhariwalUNet" and report["preconditioning"] == "vp"
    assert report["resolution"] == 8 and report["channels"] == 3 and report["label_dim"] == 10
    assert report["parameters"] == sum(p.numel() for p in net.parameters())
    assert report["format"] == "edm-pickle" and report["edm"]["class_name"] == "VPPrecond"
    result = cli("teacher", "convert", pkl, tmp_path / "adm.safetensors")
    assert result.code == 0, result.stderr
    converted = load_denoiser(tmp_path / "adm.safetensors")
    assert converted.info["converted_from"] == "adm.pkl"
    assert torch.equal(outputs(converted.denoiser, 10), outputs(net, 10))


class Exploit:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Exploit(marker)}))
    with pytest.raises(DisbackError, match=r"refusing posix\.system: not on the allow-list"):
        open_teacher(str(path))
    assert not marker.exists()


def test_hostile_module_source_is_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    source = f"open({str(marker)!r}, 'w').write('ran')\nimport os\nos.system('touch {marker}')\n"
    net, init_kwargs = tiny_network("ddpmpp", "edm")
    path = write_edm_snapshot(tmp_path / "src.pkl", net, init_kwargs, module_src=source)
    teacher = open_teacher(str(path))  # the weights are fine; the source is only hashed
    assert not marker.exists()
    assert torch.equal(outputs(teacher.denoiser, 0), outputs(net, 0))
    evil = write_edm_snapshot(
        tmp_path / "cls.pkl", net, init_kwargs, module_src=source, class_name="Backdoor"
    )
    with pytest.raises(DisbackError, match="unsupported network class 'Backdoor'"):
        open_teacher(str(evil))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not a pickle at all", "not a readable EDM network pickle"),
        (pickle.dumps({"model": 1}), "no 'ema' network"),
        (pickle.dumps({"ema": [1, 2]}), "no EDM network found"),
        (pickle.dumps(eval), "refusing builtins.eval"),
    ],
)
def test_garbage_pickles_are_one_line_errors(tmp_path, payload, message):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(DisbackError, match=message) as info:
        open_teacher(str(path))
    assert "\n" not in str(info.value)


def test_truncated_pickle_is_refused(tmp_path):
    net, init_kwargs = tiny_network("ddpmpp", "edm")
    data = edm_pickle_bytes(net, net, init_kwargs)
    path = tmp_path / "cut.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DisbackError, match="not a readable EDM network pickle"):
        open_teacher(str(path))


def test_describe_builtin_teacher():
    report = describe_teacher(open_teacher("builtin:ring2d"))
    assert report["architecture"] == "mlp" and report["resolution"] is None
    assert report["dataset"] == "ring2d" and report["parameters"] > 30000
