"""Where nodes are recorded and which node is the target: pure functions, unit-tested."""

from __future__ import annotations


def node_steps(iters: int, nodes: int) -> list[int]:
    """Recording steps of path nodes 0..nodes, evenly spaced; node 0 (step 0) is the teacher."""
    if not 1 <= nodes <= iters:
        raise ValueError(f"need 1 <= nodes <= iters, got nodes={nodes}, iters={iters}")
    return [round(i * iters / nodes) for i in range(nodes + 1)]


def target_node(iteration: int, last_node: int, interval: int) -> int:
    """Path node used as the target at 0-based `iteration` of backtracking.

    The fake score starts at node `last_node` (fitted to G0); the target starts one node closer to
    the teacher, at `last_node - 1`, moves one node toward the teacher every `interval`
    iterations, and stays on the teacher (node 0) once it gets there.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    return max(last_node - 1 - iteration // interval, 0)
