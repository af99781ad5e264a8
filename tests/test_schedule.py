import pytest

from disback_cli.schedule import node_steps, target_node


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
