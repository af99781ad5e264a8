"""`disback export`'s work: a finished backtrack run's generator written in a format its family
offers (`TeacherFamily.exporters`), with a model card, into a folder only export writes to."""

from __future__ import annotations

import time
from pathlib import Path

from disback_cli.config.export import ExportConfig
from disback_cli.errors import ConfigError, DisbackError
from disback_cli.export import ExportSource
from disback_cli.export.card import card_facts, model_card
from disback_cli.method.generator import load_generator_file
from disback_cli.models.teachers import generator_family_of
from disback_cli.runtime.reporting import Reporter, SilentReporter
from disback_cli.stages.evaluation_record import last_evaluation
from disback_cli.store.export_folder import ExportFolder
from disback_cli.store.layout import backtrack_dir
from disback_cli.store.manifests import (
    BacktrackManifest,
    TrajectoryManifest,
    generator_file_of_run,
    read_manifest,
)
from disback_cli.store.metrics_log import read_metrics

CARD = "README.md"


def open_export_source(
    cfg: ExportConfig, trajectory: Path, name: str, model_folder: str | None = None
) -> ExportSource:
    """The run's generator (checked by sha256), refused unless the run has finished."""
    trajectory = Path(trajectory)
    path, sha256 = generator_file_of_run(trajectory, name, cfg.weights)
    run_dir = backtrack_dir(trajectory, name)
    run = read_manifest(run_dir, BacktrackManifest)
    if run.status != "complete":
        raise DisbackError(
            f"{run_dir}: the run has not finished (iteration {run.step} of {run.config.iters}); "
            f"finish it with `disback backtrack -T {trajectory} --name {name}` first"
        )
    recording = read_manifest(trajectory, TrajectoryManifest)
    generator, info, spec = load_generator_file(path, "cpu", sha256, cfg.verify)
    return ExportSource(generator, spec, info, trajectory, run_dir, run, recording, model_folder)


def export_run(
    cfg: ExportConfig,
    trajectory: Path,
    name: str,
    out: Path,
    force: bool = False,
    reporter: Reporter | None = None,
    model_folder: str | None = None,
) -> dict:
    """Write the export and its card; return what was written (and the card's facts)."""
    reporter = reporter or SilentReporter()
    source = open_export_source(cfg, trajectory, name, model_folder)
    family = generator_family_of(source.info)
    exporters = family.exporters()
    if cfg.format not in exporters:
        raise ConfigError(
            f"--format {cfg.format}: not offered for generators of {family.description} "
            f"(formats: {', '.join(exporters)})"
        )
    exporter = exporters[cfg.format]
    exporter.check(cfg, source)
    evaluation = last_evaluation(source.run_dir, source.info["sha256"])
    metrics = read_metrics(source.run_dir)
    folder = ExportFolder(Path(out), force)
    started = time.perf_counter()
    usage = exporter.write(cfg, source, folder, reporter)
    facts = card_facts(cfg, source, usage, evaluation, metrics)
    folder.write_bytes(CARD, model_card(facts, cfg, exporter.description).encode())
    files = folder.finish()
    sizes = {f: (folder.out / f).stat().st_size for f in files}
    return {
        "out": str(folder.out.absolute()),
        "format": cfg.format,
        "files": files,
        "bytes": sum(sizes.values()),
        "seconds": time.perf_counter() - started,
        "card": facts,
    }
