"""Where nodes are recorded and which node is the target: pure functions, unit-tested."""

from __future__ import annotations

import math

from disback_cli.errors import DisbackError


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


class FixedSchedule:
    """The paper's rule: one node every `interval` iterations (see `target_node`)."""

    def __init__(self, last_node: int, interval: int) -> None:
        self.last_node, self.interval = last_node, interval

    def target(self, iteration: int) -> int:
        return target_node(iteration, self.last_node, self.interval)

    def observe(self, score_gap) -> None:
        """Fixed switching ignores the score gap."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, source: str = "state") -> None:
        pass


class TargetHistory:
    """The node the last iteration trained against, so the log can say at which iteration the
    target moved (the rule's own state cannot: the adaptive rule has moved on by then). Saved with
    the training state, so a resumed run logs the switches an uninterrupted one does."""

    def __init__(self) -> None:
        self.node: int | None = None
        self.switched_at: int | None = None  # iterations done before the latest switch

    def used(self, iteration: int, node: int) -> None:
        """Iteration `iteration` (0-based) trained against `node`."""
        if self.node is not None and node != self.node:
            self.switched_at = iteration
        self.node = node

    def take_switch(self) -> int | None:
        switched, self.switched_at = self.switched_at, None
        return switched

    def state_dict(self) -> dict:
        return {"node": self.node}

    def load_state_dict(self, state: dict, source: str = "state") -> None:
        node = (state or {}).get("node")  # state files from before the history start afresh
        if node is not None and (type(node) is not int or not 0 <= node <= 100_000):
            raise DisbackError(f"{source}: malformed target history ({node!r:.40})")
        self.node, self.switched_at = node, None


class AdaptiveSchedule:
    """Advance when the fake score has caught up with the current target.

    The score gap mean |D_fake - D_target| is smoothed (EMA, factor `smoothing`); when its smoothed
    value has not fallen below (1 - tolerance) x its best on this node for `patience` iterations,
    the target moves one node toward the teacher. `max_interval` caps the iterations per node.
    """

    def __init__(
        self,
        last_node: int,
        patience: int,
        tolerance: float = 0.02,
        max_interval: int = 10**9,
        smoothing: float = 0.9,
    ) -> None:
        self.patience, self.tolerance, self.max_interval = patience, tolerance, max_interval
        self.smoothing = smoothing
        self.node = max(last_node - 1, 0)
        self._reset()

    def _reset(self) -> None:
        self.smoothed: float | None = None
        self.best = float("inf")
        self.since_best = 0
        self.on_node = 0

    def target(self, iteration: int) -> int:
        return self.node

    def observe(self, score_gap) -> None:
        if self.node == 0:
            return
        gap = float(score_gap)
        self.smoothed = (
            gap
            if self.smoothed is None
            else self.smoothing * self.smoothed + (1 - self.smoothing) * gap
        )
        self.on_node += 1
        if self.smoothed < (1 - self.tolerance) * self.best:
            self.best, self.since_best = self.smoothed, 0
        else:
            self.since_best += 1
        if self.since_best >= self.patience or self.on_node >= self.max_interval:
            self.node -= 1
            self._reset()

    def state_dict(self) -> dict:
        best = None if math.isinf(self.best) else self.best  # strict JSON has no infinity
        return {
            "node": self.node,
            "smoothed": self.smoothed,
            "best": best,
            "since_best": self.since_best,
            "on_node": self.on_node,
        }

    def load_state_dict(self, state: dict, source: str = "state") -> None:
        """Restore what `state_dict` saved, each value checked (it comes from a file)."""
        try:
            node, smoothed, best = state["node"], state["smoothed"], state["best"]
            since_best, on_node = state["since_best"], state["on_node"]
            counts = (node, since_best, on_node)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise ValueError("counts must be non-negative integers")
            if node > self.node:
                raise ValueError(f"node {node} lies beyond this path")
            for value in (smoothed, best):
                if value is not None and not (
                    isinstance(value, (int, float)) and (math.isfinite(value) or value == math.inf)
                ):
                    raise ValueError("gaps must be numbers")
        except (KeyError, TypeError, ValueError) as exc:
            raise DisbackError(f"{source}: malformed adaptive-switch state ({exc})") from None
        self.node, self.smoothed = node, smoothed
        self.best = math.inf if best is None else float(best)
        self.since_best, self.on_node = since_best, on_node


def make_schedule(cfg, last_node: int) -> FixedSchedule | AdaptiveSchedule:
    """Which path node is the target: always the teacher for --no-trajectory, else the rule."""
    if cfg.no_trajectory:
        return FixedSchedule(last_node=1, interval=cfg.interval)  # node 0 from the start
    if cfg.switch == "adaptive":
        return AdaptiveSchedule(last_node, cfg.switch_patience, cfg.switch_tolerance, cfg.interval)
    return FixedSchedule(last_node, cfg.interval)
