import json

import pytest
import safetensors.torch
import torch

from disback_cli.errors import DisbackError
from disback_cli.models.denoiser_files import load_denoiser, save_denoiser
from disback_cli.models.networks import NetworkSpec, build_denoiser
from disback_cli.store.statefile import load_state, save_state

SPEC = NetworkSpec(
    arch="mlp",
    arch_kwargs={"hidden": 16, "depth": 2},
    data_shape=(2,),
    precond_kwargs={"sigma_data": 1.0},
)


def test_denoiser_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = build_denoiser(SPEC)
    digest = save_denoiser(tmp_path / "d.safetensors", net, SPEC, {"role": "teacher"})
    loaded = load_denoiser(tmp_path / "d.safetensors")
    assert loaded.sha256 == digest and loaded.spec == SPEC and loaded.info == {"role": "teacher"}
    x = torch.randn(9, 2)
    assert torch.equal(loaded.denoiser(x, 0.4), net(x, 0.4))


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "d.safetensors"
    save_denoiser(path, build_denoiser(SPEC), SPEC, {})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DisbackError, match="truncated or corrupt"):
        load_denoiser(path)


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(DisbackError, match="not a disback denoiser file"):
        load_denoiser(path)


def test_weights_of_another_shape_are_refused(tmp_path):
    other = SPEC.model_copy(update={"arch_kwargs": {"hidden": 8, "depth": 2}})
    path = tmp_path / "d.safetensors"
    save_denoiser(path, build_denoiser(other), other, {})
    data = safetensors.torch.load(path.read_bytes())
    metadata = {
        "format": "disback.denoiser",
        "format_version": "1",
        "network": SPEC.model_dump_json(),
        "info": json.dumps({}),
    }
    path.write_bytes(safetensors.torch.save(data, metadata))
    with pytest.raises(DisbackError, match="another teacher"):
        load_denoiser(path)


def test_training_state_round_trip_restores_optimizer_and_random_stream(tmp_path):
    torch.manual_seed(0)
    net = build_denoiser(SPEC)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.0, 0.99))
    rng = torch.Generator().manual_seed(3)

    def train_step():
        x = torch.randn(16, 2, generator=rng)
        loss = (net(x, 0.5) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        train_step()
    digest = save_state(tmp_path / "s.safetensors", 3, {"net": net}, {"net": opt}, rng)
    train_step()
    expected = {k: v.clone() for k, v in net.state_dict().items()}

    net2 = build_denoiser(SPEC)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-3, betas=(0.0, 0.99))  # the run's config
    rng2 = torch.Generator()
    load_state(tmp_path / "s.safetensors", digest, 3, {"net": net2}, {"net": opt2}, rng2)
    net, opt, rng = net2, opt2, rng2
    train_step()
    for key, value in net2.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_training_state_with_wrong_hash_is_refused(tmp_path):
    net = build_denoiser(SPEC)
    opt = torch.optim.Adam(net.parameters())
    save_state(tmp_path / "s.safetensors", 0, {"net": net}, {"net": opt}, torch.Generator())
    with pytest.raises(DisbackError, match="sha256 does not match"):
        load_state(
            tmp_path / "s.safetensors", "0" * 64, 0, {"net": net}, {"net": opt}, torch.Generator()
        )


@pytest.mark.parametrize("preconditioning", ["edm", "vp"])
def test_loading_does_not_draw_from_the_global_random_stream(tmp_path, preconditioning):
    """Loading a path node mid-run must not shift dropout noise (found by the SIGKILL test)."""
    spec = NetworkSpec(
        arch="SongUNet",
        data_shape=(1, 8, 8),
        precond=preconditioning,
        arch_kwargs=dict(
            model_channels=8,
            channel_mult=[1],
            num_blocks=1,
            attn_resolutions=[],
            embedding_type="fourier",
        ),
    )
    torch.manual_seed(1)
    net = build_denoiser(spec)
    save_denoiser(tmp_path / "n.safetensors", net, spec, {})
    before = torch.get_rng_state()
    loaded = load_denoiser(tmp_path / "n.safetensors")
    assert torch.equal(torch.get_rng_state(), before)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.denoiser(x, 0.7), net.eval()(x, 0.7))
