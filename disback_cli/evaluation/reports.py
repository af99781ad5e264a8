"""One layout for every report `disback evaluate` writes, whatever it scored (vectors against exact
samples, digits, or images against reference statistics), so that a sweep reads them alike:

    kind        "vector" | "digits" | "image"
    metric      the headline metric's name ("mmd2", "FD-digits", "FID")
    key         its key in results and summary ("mmd2", "fd_digits", "fid")
    dataset     the ground truth's name, or null
    detector    the feature network (null for vectors)
    reference   what the samples were compared with
    samples     where they came from (absolute paths) and how many
    repeats     number of disjoint sample sets scored, each one entry of `results`
    results     per set: n and every metric (and its seeds or image range)
    summary     per metric over the sets: min, mean, max
    floor       what real data scores at the same n (null when there is none to compare)
"""

from __future__ import annotations

import statistics
from typing import Any

# Metrics where more is better; for every other one (distances, FD, TV, max class share) less is.
HIGHER_IS_BETTER = {"precision", "recall", "modes_covered", "classes_covered", "confidence"}


def summarize(results: list[dict]) -> dict[str, dict[str, float]]:
    """Min, mean and max over the sets of every numeric metric they all report."""
    keys = [
        k
        for k, v in results[0].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "n"
    ]
    summary = {}
    for key in keys:
        values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if len(values) == len(results):
            mean = statistics.fmean(values)
            summary[key] = {"min": min(values), "mean": mean, "max": max(values)}
    return summary


def make_report(
    kind: str,
    metric: str,
    key: str,
    results: list[dict],
    *,
    dataset: str | None,
    reference: dict,
    samples: dict,
    detector: dict | None = None,
    floor: dict | None = None,
    **extra: Any,
) -> dict:
    return {
        "kind": kind,
        "metric": metric,
        "key": key,
        "dataset": dataset,
        "detector": detector,
        "reference": reference,
        "samples": samples,
        "repeats": len(results),
        "results": results,
        "summary": summarize(results),
        "floor": floor,
        **extra,
    }
