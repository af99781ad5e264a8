"""The training-state file one check at a time (`store/statefile.py`): what a resume restores
(per rank), what it keeps from the run's own configuration, and each thing a shared state file
could get wrong, refused in one line naming the file."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.store.statefile import load_state, local_rng_state, save_state
from disback_cli.store.tensorfile import encode_safetensors, read_safetensors


def trained(lr: float = 0.1, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    return net, opt


def saved(tmp_path, **kwargs):
    net, opt = trained()
    rng = torch.Generator().manual_seed(5)
    torch.randn(3, generator=rng)  # move the stream off its seed
    path = tmp_path / "state.safetensors"
    digest = save_state(path, 7, {"net": net}, {"net": opt}, rng, **kwargs)
    return path, digest, net, opt, rng


def load_into(path, digest=None, step=7, rank=0, lr=0.5, verify=None):
    net, opt = trained(lr=lr, seed=1)
    rng = torch.Generator()
    verify = digest is not None if verify is None else verify
    extra = load_state(path, digest, step, {"net": net}, {"net": opt}, rng, verify, rank)
    return extra, net, opt, rng


def test_a_resume_restores_weights_moments_streams_and_loop_state_but_not_the_rates(tmp_path):
    path, digest, net, opt, rng = saved(tmp_path, extra={"switch": {"gap": 0.5}})
    global_state = torch.get_rng_state()
    torch.manual_seed(99)
    extra, loaded, loaded_opt, loaded_rng = load_into(path, digest)
    assert extra == {"switch": {"gap": 0.5}}
    assert all(
        torch.equal(a, b) for a, b in zip(net.parameters(), loaded.parameters(), strict=True)
    )
    for p, q in zip(net.parameters(), loaded.parameters(), strict=True):
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][field], loaded_opt.state[q][field])
    assert loaded_opt.param_groups[0]["lr"] == 0.5  # the run's configuration, not the file's
    assert torch.equal(loaded_rng.get_state(), rng.get_state())
    assert torch.equal(torch.get_rng_state(), global_state)


def test_each_rank_resumes_its_own_global_stream(tmp_path):
    streams = [torch.Generator().manual_seed(s).get_state() for s in (10, 11)]
    path, digest, *_ = saved(tmp_path, rank_rng=[{"cpu": streams[0]}, {"cpu": streams[1]}])
    keys = set(read_safetensors(path)[0])
    assert {"rng.global", "rng.global.rank1"} <= keys and "rng.global.rank2" not in keys
    for rank in (0, 1):
        load_into(path, digest, rank=rank)
        assert torch.equal(torch.get_rng_state(), streams[rank])
    with pytest.raises(DisbackError, match="no random state for rank 2 \\(saved with fewer"):
        load_into(path, digest, rank=2)


def test_this_processs_stream_is_saved_by_default(tmp_path):
    net, opt = trained()
    expected = local_rng_state(torch.device("cpu"))["cpu"]
    path = tmp_path / "state.safetensors"
    save_state(path, 1, {"net": net}, {"net": opt}, torch.Generator())
    assert torch.equal(read_safetensors(path)[0]["rng.global"], expected)


def rewritten(path, tensors=None, drop=(), **metadata):
    old_tensors, old_metadata, _ = read_safetensors(path)
    tensors = {k: v for k, v in {**old_tensors, **(tensors or {})}.items() if k not in drop}
    path.write_bytes(encode_safetensors(tensors, {**old_metadata, **metadata}))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metadata": {"format": "disback.denoiser"}}, "not a disback training-state file"),
        ({"metadata": {"step": "6"}}, "holds step '6', not 7"),
        ({"metadata": {"extra": "[1, 2]"}}, "loop state is not a JSON object"),
        ({"metadata": {"extra": "{"}}, "unreadable loop state"),
        ({"tensors": {"optim.net.9.exp_avg": torch.zeros(2, 3)}}, "unexpected optimiser tensor"),
        ({"tensors": {"optim.net.x.exp_avg": torch.zeros(2, 3)}}, "unexpected optimiser tensor"),
        ({"tensors": {"optim.net.0.momentum": torch.zeros(2, 3)}}, "unexpected optimiser tensor"),
        ({"tensors": {"optim.net.0.exp_avg": torch.zeros(3, 2)}}, "has the wrong shape or type"),
        (
            {"tensors": {"optim.net.0.exp_avg": torch.zeros(2, 3, dtype=torch.int32)}},
            "has the wrong shape or type",
        ),
        (
            {"tensors": {"optim.net.0.exp_avg": torch.full((2, 3), float("nan"))}},
            "optim.net.0.exp_avg holds impossible values",
        ),
        (
            {"tensors": {"optim.net.0.exp_avg_sq": -torch.ones(2, 3)}},
            "optim.net.0.exp_avg_sq holds impossible values",
        ),
        ({"tensors": {"optim.net.0.step": torch.tensor(-1.0)}}, "holds impossible values"),
        ({"drop": ["optim.net.1.exp_avg_sq"]}, "incomplete optimiser state for net"),
        ({"tensors": {"rng": torch.zeros(3, dtype=torch.uint8)}}, "random state rng is missing"),
        ({"drop": ["rng"]}, "random state rng is missing or malformed"),
        (
            {"tensors": {"rng.global": torch.zeros(5000, dtype=torch.float32)}},
            "random state rng.global is missing or malformed",
        ),
    ],
)
def test_a_bad_state_file_is_refused_in_one_line_naming_it(tmp_path, change, message):
    path, *_ = saved(tmp_path)
    rewritten(path, change.get("tensors"), change.get("drop", ()), **change.get("metadata", {}))
    with pytest.raises(DisbackError) as caught:
        load_into(path)
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_negative_first_moment_is_possible_and_accepted(tmp_path):
    path, *_ = saved(tmp_path)
    rewritten(path, {"optim.net.0.exp_avg": -torch.ones(2, 3)})
    _, _, opt, _ = load_into(path)
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"], -torch.ones(2, 3))


def test_the_metadata_names_the_step_and_the_optimiser_groups(tmp_path):
    path, *_ = saved(tmp_path, extra={"a": 1})
    _, metadata, _ = read_safetensors(path)
    assert metadata["step"] == "7" and json.loads(metadata["extra"]) == {"a": 1}
    optim = json.loads(metadata["optim"])
    assert optim["net"]["param_groups"][0]["lr"] == 0.1


def test_each_ranks_cpu_and_cuda_streams_get_keys_of_their_own(tmp_path):
    net, opt = trained()
    cpu, cuda = torch.full((10,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)
    path = tmp_path / "state.safetensors"
    streams = [{"cpu": cpu, "cuda": cuda}, {"cpu": cpu + 1, "cuda": cuda + 1}]
    save_state(path, 1, {"net": net}, {"net": opt}, torch.Generator(), rank_rng=streams)
    tensors = read_safetensors(path)[0]
    assert torch.equal(tensors["rng.global"], cpu) and torch.equal(tensors["rng.global_cuda"], cuda)
    assert torch.equal(tensors["rng.global.rank1"], cpu + 1)
    assert torch.equal(tensors["rng.global_cuda.rank1"], cuda + 1)


@pytest.mark.parametrize("index", [2, 10**90])
def test_an_optimiser_index_past_the_parameters_is_refused_with_its_key_cut_short(tmp_path, index):
    path, *_ = saved(tmp_path)
    key = f"optim.net.{index}.exp_avg"
    rewritten(path, {key: torch.zeros(2, 3)})
    with pytest.raises(DisbackError) as caught:
        load_into(path)
    assert f"unexpected optimiser tensor {key[:80]!r}" in str(caught.value)
    assert key[:81] == key or repr(key[:81]) not in str(caught.value)


def test_a_second_moment_of_zero_is_possible_and_accepted(tmp_path):
    path, *_ = saved(tmp_path)
    rewritten(path, {"optim.net.0.exp_avg_sq": torch.zeros(2, 3)})
    _, _, opt, _ = load_into(path)
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"], torch.zeros(2, 3))


def test_a_state_without_loop_state_loads_with_none(tmp_path):
    path, *_ = saved(tmp_path, extra={"a": 1})
    tensors, metadata, _ = read_safetensors(path)
    del metadata["extra"]
    path.write_bytes(encode_safetensors(tensors, metadata))
    assert load_into(path)[0] == {}


def test_weights_that_do_not_fit_name_the_network_in_the_file(tmp_path):
    path, *_ = saved(tmp_path)
    rewritten(path, {"module.net.weight": torch.zeros(5, 5)})
    with pytest.raises(DisbackError, match=r"state\.safetensors \[net\]: tensor weight has shape"):
        load_into(path)


def test_without_verification_a_changed_file_is_not_hashed(tmp_path):
    path, _, net, *_ = saved(tmp_path)
    _, loaded, *_ = load_into(path, "0" * 64, verify=False)
    assert all(
        torch.equal(a, b) for a, b in zip(net.parameters(), loaded.parameters(), strict=True)
    )
    with pytest.raises(DisbackError, match="sha256 does not match"):
        load_into(path, "0" * 64)


def test_optimiser_state_that_is_not_a_tensor_is_refused_when_saving(tmp_path):
    net, opt = trained()
    opt.state[next(net.parameters())]["count"] = 3
    with pytest.raises(TypeError, match=r"^optimiser state 'count' is not a tensor$"):
        save_state(tmp_path / "s.safetensors", 1, {"net": net}, {"net": opt}, torch.Generator())
    assert not (tmp_path / "s.safetensors").exists()
