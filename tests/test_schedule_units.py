"""Target schedules and the EMA pinned unit by unit (written against mutmut's survivors of
`method/schedule` and `method/ema`): the rules' defaults and edges, the switch history the log
reads, and every value a resume state may hold checked with the message that says which."""

from __future__ import annotations

import math

import pytest

from disback_cli.errors import DisbackError
from disback_cli.method.ema import ema_beta
from disback_cli.method.schedule import (
    AdaptiveSchedule,
    FixedSchedule,
    TargetHistory,
    node_steps,
    target_node,
)


def test_node_steps_and_the_fixed_rule_at_their_edges():
    assert node_steps(10, 1) == [0, 10] and node_steps(10, 10) == list(range(11))
    assert node_steps(7, 3) == [0, 2, 5, 7]  # round(i * 7 / 3)
    for nodes, iters in ((0, 10), (11, 10)):
        with pytest.raises(ValueError, match=r"^need 1 <= nodes <= iters"):
            node_steps(iters, nodes)
    assert [target_node(i, 3, 1) for i in range(4)] == [2, 1, 0, 0]  # interval 1 is allowed
    with pytest.raises(ValueError, match=r"^interval must be >= 1, got 0$"):
        target_node(0, 3, 0)
    rule = FixedSchedule(4, 5)
    assert [rule.target(i) for i in (0, 4, 5, 14, 15, 99)] == [3, 3, 2, 1, 0, 0]
    rule.observe(1.0)  # the fixed rule ignores the gap
    assert rule.target(5) == 2 and rule.state_dict() == {}


def test_the_history_says_after_how_many_iterations_the_target_moved():
    history = TargetHistory()
    assert history.take_switch() is None
    history.used(0, 2)
    history.used(1, 2)
    assert history.take_switch() is None  # the first node is no switch
    history.used(2, 1)
    assert history.take_switch() == 2 and history.take_switch() is None  # taken once
    assert history.state_dict() == {"node": 1}
    resumed = TargetHistory()
    resumed.load_state_dict({"node": 1})
    resumed.used(3, 1)
    assert resumed.take_switch() is None  # the same node after a resume: no switch
    resumed.load_state_dict({})  # a state from before the history: starts afresh
    assert resumed.node is None
    for bad in (-1, True, 1.5, 100_001):
        with pytest.raises(DisbackError, match=r"^s.safetensors: malformed target history"):
            TargetHistory().load_state_dict({"node": bad}, "s.safetensors")
    with pytest.raises(DisbackError, match=r"^state: malformed target history \(-1\)$"):
        TargetHistory().load_state_dict({"node": -1})  # the default source name
    for edge in (0, 100_000):  # the teacher and the largest path both load
        resumed.load_state_dict({"node": edge})
        assert resumed.node == edge


def test_the_adaptive_rule_defaults_and_its_last_node():
    rule = AdaptiveSchedule(last_node=3, patience=2)
    assert (rule.tolerance, rule.smoothing, rule.node) == (0.02, 0.9, 2)
    assert AdaptiveSchedule(last_node=0, patience=2).node == 0
    assert rule.best == math.inf and rule.state_dict()["best"] is None  # strict JSON
    teacher = AdaptiveSchedule(last_node=1, patience=1)
    for _ in range(5):
        teacher.observe(1.0)
    assert teacher.node == 0 and teacher.on_node == 0  # on the teacher it stays, and counts nothing


GOOD = {"node": 1, "smoothed": 0.5, "best": None, "since_best": 0, "on_node": 3}
BAD = [
    ({"node": -1}, "counts must be non-negative integers"),
    ({"since_best": 1.5}, "counts must be non-negative integers"),
    ({"on_node": True}, "counts must be non-negative integers"),
    ({"node": 5}, "node 5 lies beyond this path"),
    ({"smoothed": "x"}, "gaps must be numbers"),
    ({"best": math.nan}, "gaps must be numbers"),
    ({"best": -math.inf}, "gaps must be numbers"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_a_malformed_adaptive_state_is_refused_naming_what(change, message):
    rule = AdaptiveSchedule(last_node=3, patience=2)
    with pytest.raises(DisbackError) as refused:
        rule.load_state_dict({**GOOD, **change}, "s.safetensors")
    assert str(refused.value).startswith("s.safetensors: malformed adaptive-switch state (")
    assert str(refused.value).endswith(f"({message})")  # the reason, word for word
    with pytest.raises(DisbackError, match=r"^state: malformed adaptive-switch state"):
        rule.load_state_dict({**GOOD, **change})  # the default source name


def test_an_adaptive_state_round_trips():
    rule = AdaptiveSchedule(last_node=3, patience=2)
    rule.load_state_dict({**GOOD, "best": 0.25, "since_best": 2})
    restored = (rule.node, rule.smoothed, rule.best, rule.since_best, rule.on_node)
    assert restored == (1, 0.5, 0.25, 2, 3)
    rule.load_state_dict({**GOOD, "best": math.inf})  # older files saved an infinity
    assert rule.best == math.inf


def test_the_ema_half_life_is_counted_in_images_and_never_below_a_tiny_one():
    assert ema_beta(64, 10**9, 0.064, None) == pytest.approx(0.5)  # 64 images of 64
    assert ema_beta(1, 10**9, 0.0005, None) == pytest.approx(0.25)  # half-life of half an image
    assert ema_beta(8, 80, 10.0, 0.1) == pytest.approx(0.5)  # ramp-up: 0.1 x 80 images seen
    assert ema_beta(8, 0, 10.0, 0.1) == 0.0  # nothing seen yet: the weights themselves
