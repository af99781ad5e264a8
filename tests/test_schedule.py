import json

import pytest

from disback_cli.method.schedule import AdaptiveSchedule, node_steps, target_node


def test_node_steps_even_and_start_with_teacher():
    assert node_steps(600, 6) == [0, 100, 200, 300, 400, 500, 600]
    assert node_steps(10, 3) == [0, 3, 7, 10]
    assert node_steps(5, 5) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(("iters", "nodes"), [(5, 6), (10, 0)])
def test_node_steps_reject_impossible_layouts(iters, nodes):
    with pytest.raises(ValueError):
        node_steps(iters, nodes)


def test_target_walks_back_one_node_per_interval_then_stays_on_teacher():
    schedule = [target_node(i, last_node=6, interval=100) for i in range(0, 800, 50)]
    assert schedule == [5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0, 0, 0, 0]
    assert target_node(99, 6, 100) == 5 and target_node(100, 6, 100) == 4
    assert target_node(10**6, 6, 100) == 0


def test_single_node_path_targets_teacher_immediately():
    assert [target_node(i, 1, 10) for i in (0, 5, 50)] == [0, 0, 0]


def test_interval_must_be_positive():
    with pytest.raises(ValueError):
        target_node(0, 3, 0)


# Two resumes in the middle of node 2 (the switch starts on node 3 and has left it once), each
# with the gaps still to come: one where the patience rule decides when the target moves, one
# where the cap on iterations per node does.
SCENARIOS = {
    # node 3: 1.0 four times, no improvement after the first -> node 2; then 0.8 (best),
    # 1.2 and 0.8 (smoothed 1.0, then 0.9: not below 0.9 x 0.8) -> 2 iterations since the best.
    # Next, 0.6 smooths to 0.75, still not below 0.72: the third miss moves the target.
    "patience": (
        dict(last_node=4, patience=3, tolerance=0.1, smoothing=0.5),
        [1.0] * 4 + [0.8, 1.2, 0.8],
        [0.6, 1.0, 1.0, 1.0, 1.0],
    ),
    # patience 100: only the cap of 4 iterations per node moves the target (4 on node 3, then
    # 2 on node 2 before the resume)
    "cap": (
        dict(last_node=4, patience=100, tolerance=0.1, smoothing=0.5, max_interval=4),
        [1.0, 0.8, 0.6, 0.4, 1.0, 0.8],
        [0.6, 0.4, 0.3, 0.2, 0.1, 0.05],
    ),
}
FIELDS = ("node", "smoothed", "best", "since_best", "on_node")


def decisions_after(schedule: AdaptiveSchedule, gaps: list[float], start: int) -> list:
    """The target after each further gap, and the whole state after it."""
    out = []
    for i, gap in enumerate(gaps):
        schedule.observe(gap)
        out.append((schedule.target(start + i + 1), schedule.state_dict()))
    return out


def resumed(kwargs: dict, state: dict) -> AdaptiveSchedule:
    copy = AdaptiveSchedule(**kwargs)
    copy.load_state_dict(json.loads(json.dumps(state)))  # as read back from a state file
    return copy


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_adaptive_switch_resumed_mid_node_makes_the_same_decisions(scenario):
    kwargs, before, after = SCENARIOS[scenario]
    original = AdaptiveSchedule(**kwargs)
    for gap in before:
        original.observe(gap)
    state = original.state_dict()
    assert state["node"] == 2 and state["on_node"] > 0  # in the middle of a node, not node 0
    copy = resumed(kwargs, state)
    assert copy.state_dict() == state
    expected = decisions_after(original, after, len(before))
    assert decisions_after(copy, after, len(before)) == expected
    assert expected[-1][0] < 2  # the target did move on after the resume


def test_every_field_of_the_adaptive_switch_state_changes_later_decisions():
    """Restoring all but one field (that one left as a fresh schedule has it) changes the
    targets chosen after the resume in at least one scenario: the test above would catch a
    resume that drops any one of them."""
    for field in FIELDS:
        changed = []
        for name, (kwargs, before, after) in SCENARIOS.items():
            original = AdaptiveSchedule(**kwargs)
            for gap in before:
                original.observe(gap)
            state = original.state_dict()
            partial = {**state, field: AdaptiveSchedule(**kwargs).state_dict()[field]}
            assert partial != state, field
            full = [t for t, _ in decisions_after(resumed(kwargs, state), after, len(before))]
            part = [t for t, _ in decisions_after(resumed(kwargs, partial), after, len(before))]
            if part != full:
                changed.append(name)
        assert changed, f"no scenario depends on {field}"


def test_the_adaptive_switch_smooths_the_gap_with_weight_0_9_on_the_past():
    schedule = AdaptiveSchedule(last_node=3, patience=100, smoothing=0.9)
    for gap in (1.0, 0.5, 0.25):
        schedule.observe(gap)
    # s1 = 1, s2 = 0.9 * 1 + 0.1 * 0.5 = 0.95, s3 = 0.9 * 0.95 + 0.1 * 0.25 = 0.88
    assert schedule.smoothed == pytest.approx(0.88, abs=1e-12)
