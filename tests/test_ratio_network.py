"""The density-ratio network one part at a time (`models/ratio.py`): its input scaling and noise
features, its shapes for vectors and images, its defaults, its bound on size, and its file (the
verifier of best-of-K sampling)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from disback_cli.errors import DisbackError
from disback_cli.models.ratio import (
    FORMAT,
    RatioNetwork,
    RatioSpec,
    _fourier,
    _groups,
    build_ratio,
    load_ratio,
    ratio_spec_for,
    save_ratio,
)
from disback_cli.store.tensorfile import encode_safetensors, read_safetensors

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("channels", "groups"), [(1, 1), (7, 7), (8, 8), (9, 3), (10, 5), (12, 6), (16, 8), (17, 1)]
)
def test_group_norm_takes_the_largest_divisor_up_to_eight(channels, groups):
    assert _groups(channels) == groups


def test_noise_features_are_sines_then_cosines_of_whole_multiples():
    log_sigma = torch.tensor([0.3, -1.2])
    features = _fourier(log_sigma, 6)
    assert features.shape == (2, 6)
    for row, value in zip(features, log_sigma.tolist(), strict=True):
        sines = [math.sin(k * value) for k in (1, 2, 3)]
        expected = sines + [math.cos(k * value) for k in (1, 2, 3)]
        assert row.tolist() == pytest.approx(expected, abs=1e-6)


def first_layer_input(network: RatioNetwork, *args, **kwargs) -> torch.Tensor:
    seen = []
    handle = network.body[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    network(*args, **kwargs)
    handle.remove()
    return seen[0]


def test_the_mlp_sees_unit_variance_inputs_noise_features_and_labels():
    spec = RatioSpec(arch="mlp", data_shape=(3,), label_dim=2, sigma_data=0.7, width=8, depth=2)
    network = RatioNetwork(spec)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 1.0, 4.0, 30.0])
    labels = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
    seen = first_layer_input(network, x.double(), sigma, class_labels=labels)
    assert seen.shape == (4, 3 + 16 + 2) and seen.dtype == torch.float32
    torch.testing.assert_close(seen[:, :3], x / (0.7**2 + sigma[:, None] ** 2).sqrt())
    torch.testing.assert_close(seen[:, 3:19], _fourier(sigma.log() / 4, 16))
    assert torch.equal(seen[:, 19:], labels.float())
    unlabelled = first_layer_input(network, x, sigma)
    assert torch.equal(unlabelled[:, 19:], torch.zeros(4, 2))  # no labels: zeros, not an error


def test_one_noise_level_serves_the_whole_batch():
    network = build_ratio(RatioSpec(arch="mlp", data_shape=(2,)), seed=0)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(network(x, 2.5), network(x, torch.full((5,), 2.5)))
    assert network(x, 2.5).shape == (5,)


def test_the_mlp_has_its_width_and_depth():
    network = RatioNetwork(RatioSpec(arch="mlp", data_shape=(2, 3), width=10, depth=4))
    linears = [m for m in network.body if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6 + 16, 10)] + [(10, 10)] * 3
    assert (network.out.in_features, network.out.out_features) == (10, 1)


def test_the_conv_encoder_doubles_its_channels_up_to_eight_times_its_width():
    spec = RatioSpec(arch="conv", data_shape=(3, 16, 16), label_dim=5, width=4, depth=4)
    network = RatioNetwork(spec)
    convs = [m for m in network.body if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.stride) for m in convs] == [
        (4, 8, (2, 2)),
        (8, 16, (2, 2)),
        (16, 32, (2, 2)),
        (32, 32, (2, 2)),
    ]
    norms = [m.num_groups for m in network.body if isinstance(m, torch.nn.GroupNorm)]
    assert norms == [4, 8, 8, 8]
    assert (network.stem.in_channels, network.embed.in_features) == (3, 16 + 5)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert network(x, torch.tensor([0.5, 2.0])).shape == (2,)


def test_the_conv_input_is_scaled_to_unit_variance():
    network = RatioNetwork(RatioSpec(arch="conv", data_shape=(1, 4, 4), sigma_data=0.5, width=2))
    seen = []
    network.stem.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    network(x, torch.tensor([1.0, 9.0]))
    scale = torch.tensor([1 / math.sqrt(1.25), 1 / math.sqrt(81.25)]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(seen[0], x * scale)


def test_a_conv_network_needs_images():
    with pytest.raises(DisbackError, match="a conv ratio network needs images"):
        RatioNetwork(RatioSpec(arch="conv", data_shape=(5,)))


def test_the_default_networks_by_data_shape():
    vectors = ratio_spec_for((2,), 0, 1.4, None, None)
    assert (vectors.arch, vectors.width, vectors.depth, vectors.sigma_data) == ("mlp", 64, 3, 1.4)
    images = ratio_spec_for((3, 8, 8), 10, 0.5, None, None)
    assert (images.arch, images.width, images.depth, images.label_dim) == ("conv", 16, 3, 10)
    chosen = ratio_spec_for((3, 8, 8), 0, 0.5, 12, 2)
    assert (chosen.width, chosen.depth, chosen.data_shape) == (12, 2, (3, 8, 8))


def test_building_is_seeded_and_leaves_the_global_stream_alone():
    spec = RatioSpec(arch="mlp", data_shape=(2,))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = build_ratio(spec, seed=4), build_ratio(spec, seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_ratio(spec)  # seed 0
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_a_network_too_large_is_refused_before_it_is_built():
    spec = RatioSpec(arch="mlp", data_shape=(4096, 4096), width=4096, depth=2)
    with pytest.raises(DisbackError) as caught:
        build_ratio(spec, "big.safetensors")
    count = (4096 * 4096 + 16) * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 + 1
    assert str(caught.value) == (
        f"big.safetensors: a ratio network of {count:,} parameters is too large"
    )


def test_a_ratio_file_round_trips_with_its_spec_and_info(tmp_path):
    spec = RatioSpec(arch="conv", data_shape=(1, 4, 4), label_dim=3, width=4, depth=2)
    network = build_ratio(spec, seed=2)
    digest = save_ratio(tmp_path / "r.safetensors", network, {"role": "verifier", "step": 4})
    _, metadata, _ = read_safetensors(tmp_path / "r.safetensors")
    assert metadata["format"] == FORMAT and json.loads(metadata["network"])["width"] == 4
    loaded, info = load_ratio(tmp_path / "r.safetensors", CPU, digest)
    assert loaded.spec == spec and info == {"role": "verifier", "step": 4}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(x, 1.0), network(x, 1.0))


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"format": "disback.denoiser"}, "not a disback ratio network file"),
        ({"format_version": "2"}, "not a disback ratio network file"),
        ({"network": "{"}, "bad ratio network metadata"),
        ({"network": json.dumps({"arch": "mlp", "data_shape": [2], "width": 0})}, "bad ratio"),
        ({"info": "[1"}, "bad ratio network metadata"),
    ],
)
def test_a_bad_ratio_file_is_refused_in_one_line(tmp_path, metadata, message):
    network = build_ratio(RatioSpec(arch="mlp", data_shape=(2,)))
    save_ratio(tmp_path / "r.safetensors", network, {})
    tensors, old, _ = read_safetensors(tmp_path / "r.safetensors")
    (tmp_path / "r.safetensors").write_bytes(encode_safetensors(tensors, {**old, **metadata}))
    with pytest.raises(DisbackError) as caught:
        load_ratio(tmp_path / "r.safetensors", CPU)
    assert message in str(caught.value) and str(tmp_path / "r.safetensors") in str(caught.value)


def test_a_ratio_file_without_info_loads_with_none(tmp_path):
    network = build_ratio(RatioSpec(arch="mlp", data_shape=(2,)))
    save_ratio(tmp_path / "r.safetensors", network, {})
    tensors, old, _ = read_safetensors(tmp_path / "r.safetensors")
    del old["info"]
    (tmp_path / "r.safetensors").write_bytes(encode_safetensors(tensors, old))
    assert load_ratio(tmp_path / "r.safetensors", CPU)[1] == {}


def test_the_size_bound_is_inclusive_and_names_a_default_source(monkeypatch):
    from disback_cli.models import ratio as ratio_module

    spec = RatioSpec(arch="mlp", data_shape=(2,), width=8, depth=1)
    count = sum(p.numel() for p in RatioNetwork(spec).parameters())
    monkeypatch.setattr(ratio_module, "MAX_PARAMETERS", count)
    build_ratio(spec)
    monkeypatch.setattr(ratio_module, "MAX_PARAMETERS", count - 1)
    with pytest.raises(DisbackError, match=rf"^ratio network: a ratio network of {count} "):
        build_ratio(spec)


def test_the_default_seed_is_zero():
    spec = RatioSpec(arch="mlp", data_shape=(2,))
    assert same(build_ratio(spec), build_ratio(spec, seed=0))


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_a_ratio_file_is_hashed_unless_told_not_to_and_its_errors_name_it(tmp_path, monkeypatch):
    from disback_cli.models import ratio as ratio_module

    network = build_ratio(RatioSpec(arch="mlp", data_shape=(2,)))
    path = tmp_path / "r.safetensors"
    save_ratio(path, network, {})
    with pytest.raises(DisbackError, match="sha256 does not match"):
        load_ratio(path, CPU, "0" * 64)
    assert same(load_ratio(path, CPU, "0" * 64, verify=False)[0], network)
    monkeypatch.setattr(ratio_module, "MAX_PARAMETERS", 10)
    with pytest.raises(DisbackError, match=f"^{path}: a ratio network of "):
        load_ratio(path, CPU)
    monkeypatch.undo()
    tensors, metadata, _ = read_safetensors(path)
    del tensors[next(iter(tensors))]
    path.write_bytes(encode_safetensors(tensors, metadata))
    with pytest.raises(DisbackError, match=f"^{path}: weights do not match the network"):
        load_ratio(path, CPU)


def test_the_conv_encoder_keeps_its_geometry():
    """Weights alone do not fix padding: a file must compute what it computed when saved. The
    stem keeps the image's size, each strided layer halves it, the label and noise embedding is
    added to every position of the stem's features."""
    spec = RatioSpec(arch="conv", data_shape=(3, 16, 16), label_dim=2, width=4, depth=3)
    network = RatioNetwork(spec)
    sizes, stem, first = [], [], []
    for layer in network.body:
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:])))
    network.stem.register_forward_hook(lambda m, i, o: stem.append(o))
    network.body[0].register_forward_hook(lambda m, i, o: first.append(i[0]))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma, labels = torch.tensor([0.5, 2.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    network(x, sigma, class_labels=labels)
    assert tuple(stem[0].shape) == (2, 4, 16, 16) and sizes == [(8, 8), (4, 4), (2, 2)]
    extra = torch.cat([_fourier(sigma.log() / 4, 16), labels], dim=1)
    embedded = network.embed(extra)[:, :, None, None]
    torch.testing.assert_close(first[0], stem[0] + embedded)


def test_a_float64_noise_level_is_read_as_float32():
    network = build_ratio(RatioSpec(arch="mlp", data_shape=(2,)))
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(network(x, sigma), network(x, sigma.float()))


def test_the_conv_refusal_is_exactly_one_line():
    with pytest.raises(DisbackError) as caught:
        RatioNetwork(RatioSpec(arch="conv", data_shape=(5,)))
    assert str(caught.value) == "a conv ratio network needs images (C, H, W)"
