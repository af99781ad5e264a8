"""Evaluations remembered by the run they measured: `disback evaluate` appends its report to
the backtrack run whose current generator file it scored (sampled on the fly, or samples whose
provenance names that file and its sha256), so `disback export` can quote it in a model card."""

from __future__ import annotations

from pathlib import Path

from disback_cli import __version__
from disback_cli.errors import DisbackError
from disback_cli.store.evaluations import add_evaluation, read_evaluations
from disback_cli.store.layout import EVALUATIONS
from disback_cli.store.manifests import BacktrackManifest, read_manifest

CHECKPOINTS = "checkpoints"


def _run_of(generator: object, sha256: object) -> tuple[Path, str] | None:
    """The run directory whose current generator file (raw or EMA) is `generator` with this
    sha256, and which weights it holds; None for any other file (moved, older, exported)."""
    if not (isinstance(generator, str) and isinstance(sha256, str)) or len(generator) > 4096:
        return None
    path = Path(generator)
    if path.parent.name != CHECKPOINTS:
        return None
    run_dir = path.parent.parent
    try:
        run = read_manifest(run_dir, BacktrackManifest)
    except DisbackError:
        return None
    for weights, ref in (("ema", run.generator_ema), ("raw", run.generator)):
        if ref is not None and ref.sha256 == sha256 and ref.file == f"{CHECKPOINTS}/{path.name}":
            return run_dir, weights
    return None


def remember_evaluation(report: dict) -> str | None:
    """Append `report` to its run's evaluations.jsonl; return that file, or None when the
    samples do not come from a run's current generator."""
    samples = report.get("samples") or {}
    named = samples.get("provenance", samples)  # sample files record it; a run sampled on the fly
    sha256 = named.get("generator_sha256") if isinstance(named, dict) else None
    found = _run_of(named.get("generator"), sha256) if isinstance(named, dict) else None
    if found is None:
        return None
    run_dir, weights = found
    entry = {**report, "generator_sha256": sha256, "weights": weights}
    add_evaluation(run_dir, {**entry, "disback_version": __version__})
    return str(run_dir / EVALUATIONS)


def last_evaluation(run_dir: Path, sha256: str) -> dict | None:
    """The last recorded report on the generator file with this sha256."""
    matching = [r for r in read_evaluations(run_dir) if r["generator_sha256"] == sha256]
    return matching[-1] if matching else None
