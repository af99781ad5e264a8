"""What a sweep asks of its runs: grouped over seeds (or any keys), which group won, by how much,
with what spread. `disback runs --group-by` prints these; the arithmetic lives here.

A group's statistics are n, mean, sample standard deviation, min and max of every numeric metric
(`final_*`, `best_*` scores, `seconds`). Against a baseline group (the group that differs from it
only in the `--baseline KEY=VALUE` keys) each group gets the difference of means and a verdict,
given only where the two groups' [min, max] ranges do not overlap: with a few seeds, overlapping
ranges are no evidence either way.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from disback_cli.errors import ConfigError
from disback_cli.evaluation.reports import HIGHER_IS_BETTER


def metric_keys(rows: list[dict]) -> list[str]:
    """The numeric scores in these rows: final and best metrics (not where a best was reached)
    and the wall time."""
    keys = dict.fromkeys(k for row in rows for k in row)
    wanted = [
        k
        for k in keys
        if (k.startswith(("final_", "best_")) and not k.endswith("_at")) or k == "seconds"
    ]
    return [k for k in wanted if any(_number(row.get(k)) is not None for row in rows)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _stats(values: list[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def group_rows(rows: list[dict], by: list[str]) -> list[dict]:
    """One entry per distinct value of the `by` keys, in first-seen order: the key values, the
    runs and the statistics of each metric over the runs that have it."""
    missing = [k for k in by if rows and all(k not in row for row in rows)]
    if missing:
        keys = ", ".join(dict.fromkeys(k for row in rows for k in row))
        raise ConfigError(f"--group-by {missing[0]!r}: no such key in these rows (keys: {keys})")
    metrics = metric_keys(rows)
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k)) for k in by), []).append(row)
    out = []
    for values, members in groups.items():
        stats = {}
        for metric in metrics:
            numbers = [n for row in members if (n := _number(row.get(metric))) is not None]
            if numbers:
                stats[metric] = _stats(numbers)
        out.append(
            {
                "group": dict(zip(by, values, strict=True)),
                "n": len(members),
                "runs": [row["run"] for row in members],
                "metrics": stats,
            }
        )
    return out


def parse_baseline(text: str, by: list[str]) -> dict[str, str]:
    """`--baseline KEY=VALUE[,KEY=VALUE]`: which values of which grouping keys mark a baseline."""
    chosen = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in by:
            raise ConfigError(
                f"--baseline {part!r:.60}: expected KEY=VALUE with KEY one of the --group-by "
                f"keys ({', '.join(by)}), e.g. --baseline method=baseline"
            )
        chosen[key.strip()] = value.strip()
    return chosen


def compare_to_baseline(groups: list[dict], baseline: dict[str, str]) -> None:
    """Add to each non-baseline group, per metric, the difference of means against its baseline
    group and a verdict where the ranges do not overlap ("better"/"worse")."""
    index = {tuple(sorted(g["group"].items())): g for g in groups}
    for group in groups:
        if all(group["group"][k].lower() == v.lower() for k, v in baseline.items()):
            continue
        partner = index.get(tuple(sorted({**group["group"], **_case_of(groups, baseline)}.items())))
        if partner is None:
            continue
        group["baseline"] = partner["group"]
        for metric, ours in group["metrics"].items():
            theirs = partner["metrics"].get(metric)
            if theirs is None:
                continue
            ours["vs_baseline"] = ours["mean"] - theirs["mean"]
            ours["verdict"] = range_verdict(metric, ours, theirs)


def _case_of(groups: list[dict], baseline: dict[str, str]) -> dict[str, str]:
    """The baseline values as the groups spell them (matched without regard to case)."""
    spelled = dict(baseline)
    for group in groups:
        for key, value in baseline.items():
            if group["group"][key].lower() == value.lower():
                spelled[key] = group["group"][key]
    return spelled


def range_verdict(metric: str, ours: dict, theirs: dict) -> str | None:
    """Whether `ours` is "better" or "worse" than `theirs` ({"min", "max"} over seeds), by the
    direction of `metric`; None where the ranges overlap."""
    if ours["min"] > theirs["max"]:
        higher = True
    elif ours["max"] < theirs["min"]:
        higher = False
    else:
        return None  # the ranges overlap: no verdict
    if metric == "seconds" or metric.split("_", 1)[-1] not in HIGHER_IS_BETTER:
        return "worse" if higher else "better"
    return "better" if higher else "worse"
