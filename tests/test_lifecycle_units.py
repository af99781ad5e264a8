"""The run lifecycle's small rules one by one (`stages/lifecycle.py`): the optimisers, the two
random streams, what counts as a configuration change, and the divergence stop's message. Runs
that resume, extend and stop are in test_backtrack.py, test_record.py and test_recovery.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disback_cli.errors import DisbackError
from disback_cli.runtime.parallel import Execution
from disback_cli.stages.lifecycle import (
    BACKTRACKING,
    RECORDING,
    check_finite,
    config_changes,
    make_optimizer,
    seed_streams,
)
from disback_cli.store.manifests import StateRef


def test_adam_or_adamw_with_the_given_rates_and_decay():
    params = list(nn.Linear(2, 2).parameters())
    adam = make_optimizer(params, 0.01, (0.0, 0.99))
    assert type(adam) is torch.optim.Adam
    group = adam.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["foreach"]) == (
        0.01,
        (0.0, 0.99),
        0,
        True,
    )
    adamw = make_optimizer(params, 0.02, (0.9, 0.999), "adamw", weight_decay=0.01)
    assert type(adamw) is torch.optim.AdamW
    group = adamw.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["foreach"]) == (
        0.02,
        (0.9, 0.999),
        0.01,
        True,
    )


def test_the_run_stream_is_the_seed_and_the_global_stream_is_the_ranks():
    rng = seed_streams(7, Execution(torch.device("cpu")))
    assert torch.equal(rng.get_state(), torch.Generator().manual_seed(7).get_state())
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(7).get_state())
    second = Execution(torch.device("cpu"), rank=1, world_size=2)
    rng = seed_streams(7, second)
    assert torch.equal(rng.get_state(), torch.Generator().manual_seed(7).get_state())
    own = torch.Generator().manual_seed(second.rank_seed(7)).get_state()
    assert torch.equal(torch.get_rng_state(), own) and second.rank_seed(7) != 7


def test_configuration_changes_are_listed_field_by_field():
    assert config_changes({"a": 1, "b": 2}, {"a": 1, "b": 2}) == []
    assert config_changes({"a": 1, "b": 2}, {"b": 3, "a": 1, "c": None}) == ["b: 2 -> 3"]
    assert config_changes({"a": 1}, {"a": "1", "z": 0}) == ["a: 1 -> '1'", "z: None -> 0"]


def test_finite_values_pass_and_a_divergence_names_the_last_good_checkpoint(tmp_path):
    check_finite(3, tmp_path, None, loss=torch.tensor(1.0), grad=torch.tensor(2.0))
    state = StateRef(file="checkpoints/state-00000040.safetensors", sha256="0" * 64, step=40)
    with pytest.raises(DisbackError) as caught:
        check_finite(47, tmp_path, state, loss=torch.tensor(float("nan")), grad=torch.tensor(2.0))
    assert str(caught.value) == (
        f"diverged at iteration 47 (loss nan, grad 2); nothing from it was saved; last good "
        f"checkpoint {tmp_path / state.file} (iteration 40) is intact; lower the learning rate "
        "or set --grad-clip and restart with --force"
    )
    with pytest.raises(DisbackError, match="no checkpoint had been saved yet"):
        check_finite(1, tmp_path, None, grad=torch.tensor(float("-inf")))


def test_a_divergence_on_another_rank_stops_this_one_too(tmp_path):
    with pytest.raises(DisbackError, match="diverged at iteration 2"):
        check_finite(2, tmp_path, None, lambda bad: True, loss=torch.tensor(1.0))
    check_finite(2, tmp_path, None, lambda bad: False, loss=torch.tensor(float("nan")))


def test_what_each_stage_keeps():
    """A backtrack run may be extended (iters), keeps its final state and its metrics log; a
    recording is its path nodes alone."""
    assert (BACKTRACKING.extendable, BACKTRACKING.final_state, BACKTRACKING.metrics_log) == (
        ("iters",),
        True,
        True,
    )
    assert (RECORDING.extendable, RECORDING.final_state, RECORDING.metrics_log) == (
        (),
        False,
        False,
    )
