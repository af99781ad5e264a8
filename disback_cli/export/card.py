"""The model card (README.md) of every export: where the weights come from, how they were
trained, what was measured on them and how to use them, each value read from the run's files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from disback_cli import __version__
from disback_cli.config.export import ExportConfig
from disback_cli.errors import DisbackError
from disback_cli.export import ExportSource, Usage
from disback_cli.store.fileio import read_regular_file

MAX_TEACHER_README = 1 << 20
LICENSE_LINE = re.compile(r"license:\s*(\S.{0,99})")


def teacher_licence(source: str) -> str | None:
    """The `license:` field of a teacher folder's README.md front matter (a model hub's card),
    if it has one; None for files, and for anything that is not a plain readable README."""
    readme = Path(source) / "README.md"
    if not Path(source).is_dir() or readme.is_symlink() or not readme.is_file():
        return None
    try:
        text = read_regular_file(readme, MAX_TEACHER_README, "model card").decode("utf-8")
    except (DisbackError, UnicodeDecodeError):
        return None
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            return None
        match = LICENSE_LINE.fullmatch(line.strip())
        if match:
            return match[1].strip().strip("\"'")
    return None


def card_facts(
    cfg: ExportConfig,
    source: ExportSource,
    usage: Usage,
    evaluation: dict | None,
    metrics: list[dict],
) -> dict[str, Any]:
    """Every value the card shows, for the card and for `--json`."""
    run, recording, info = source.run, source.recording, source.info
    config = run.config
    return {
        "disback_version": __version__,
        "format": cfg.format,
        "dtype": cfg.dtype,
        "weights": cfg.weights,
        "generator": {
            "file": str(Path(info["file"]).relative_to(source.run_dir.absolute())),
            "sha256": info["sha256"],
            "sigma_init": info["sigma_init"],
            "input_scale": info.get("input_scale", info["sigma_init"]),
        },
        "teacher": {
            "source": recording.teacher.source,
            "sha256": recording.teacher.sha256,
            "licence": teacher_licence(recording.teacher.source),
        },
        "trajectory": {
            "path": str(source.trajectory.absolute()),
            "nodes": recording.last_node,
            "iterations": recording.config.iters,
            "seed": recording.config.seed,
        },
        "run": {
            "name": run.name,
            "method": "baseline (no path)" if config.no_trajectory else "DisBack",
            "loss": config.loss,
            "adversary": config.adversary,
            "iterations": run.step,
            "seed": config.seed,
            "global_batch": run.global_batch or config.batch * run.world_size,
        },
        "evaluation": evaluation,
        "training_evaluation": training_evaluation(metrics, run.step, cfg.weights),
        "usage": {"snippet": usage.snippet, **usage.facts},
        "config": {"record": recording.config.identity(), "backtrack": config.identity()},
    }


def training_evaluation(lines: list[dict], step: int, weights: str) -> dict | None:
    """What `backtrack --eval-every` measured on the final EMA weights (its last log line)."""
    last = lines[-1] if lines else {}
    if weights != "ema" or last.get("iteration") != step or "eval" not in last:
        return None
    return {"iteration": step, **last["eval"]}


def _training_lines(measured: dict | None) -> list[str]:
    if measured is None:
        return []
    values = ", ".join(f"{k} {v:.6g}" for k, v in measured.items() if k != "iteration")
    return [
        "",
        f"During training (`backtrack --eval-every`, the run's metrics.jsonl), at iteration "
        f"{measured['iteration']} on these EMA weights: {values}.",
    ]


def _evaluation_lines(evaluation: dict | None) -> list[str]:
    if evaluation is None:
        return [
            "No evaluation of these weights is recorded. `disback evaluate -T TRAJECTORY --name "
            "NAME` (EMA weights) or `disback evaluate SAMPLES` on samples of them records one."
        ]
    keys, rows = _numbers(evaluation)
    lines = [f"{evaluation.get('metric')} of the {evaluation['weights']} weights:", ""]
    lines += ["| repeat | " + " | ".join(keys) + " |", "|---" * (1 + len(keys)) + "|"]
    for index, values in enumerate(rows, start=1):
        lines.append(f"| {index} | " + " | ".join(f"{v:.6g}" for v in values) + " |")
    detector = evaluation.get("detector") or {}
    provenance = {
        "samples": evaluation.get("samples"),
        "reference": evaluation.get("reference"),
        "detector": {k: detector.get(k) for k in ("name", "mode", "sha256")} if detector else None,
        "disback_version": evaluation.get("disback_version"),
    }
    lines += ["", "Provenance (from evaluations.jsonl of the run):", "", "```json"]
    lines += [json.dumps(provenance, indent=2, default=str), "```"]
    return lines


def _numbers(evaluation: dict) -> tuple[list[str], list[list[float]]]:
    """The numeric columns of each repeat's result."""
    results = [r for r in evaluation.get("results") or [] if isinstance(r, dict)]
    first = results[0] if results else {}
    main = evaluation.get("key")
    keys = [
        k
        for k in sorted(first, key=lambda k: (k != main, k))  # the report's own metric first
        if all(
            isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in results
        )
    ]
    return keys, [[float(r[k]) for k in keys] for r in results]


def model_card(facts: dict[str, Any], cfg: ExportConfig, description: str) -> str:
    """The README.md text of an export (see the module docstring)."""
    gen, teacher, traj, run = (
        facts["generator"],
        facts["teacher"],
        facts["trajectory"],
        facts["run"],
    )
    adversary = f" + {run['adversary']} adversary" if run["adversary"] not in (None, "none") else ""
    rows = [
        ("format", f"{description} (`--format {cfg.format}`, {cfg.dtype})"),
        ("weights", f"{cfg.weights}: `{gen['file']}`, sha256 `{gen['sha256']}`"),
        (
            "generator",
            f"x = D(input_scale z, sigma_init), sigma_init {gen['sigma_init']:.6g}, "
            f"input_scale {gen['input_scale']:.6g}",
        ),
        ("teacher", f"`{teacher['source']}`, sha256 `{teacher['sha256']}`"),
        ("teacher licence", teacher["licence"] or "not stated in the teacher's folder"),
        (
            "path",
            f"{traj['nodes']} nodes recorded in {traj['iterations']} iterations, "
            f"seed {traj['seed']} (`{traj['path']}`)",
        ),
        (
            "training",
            f"{run['method']}, loss {run['loss']}{adversary}: {run['iterations']} "
            f"iterations, global batch {run['global_batch']}, seed {run['seed']} "
            f"(run `{run['name']}`)",
        ),
    ]
    lines = [
        "# One-step generator distilled with DisBack",
        "",
        f"Exported by disback {facts['disback_version']} from a finished backtrack run.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "## Use",
        "",
        "```python" if "import " in facts["usage"]["snippet"] else "```sh",
        facts["usage"]["snippet"].rstrip(),
        "```",
        "",
        "## Measured",
        "",
        *_evaluation_lines(facts["evaluation"]),
        *_training_lines(facts["training_evaluation"]),
        "",
        "## Configuration",
        "",
        "The resolved configurations of the recording and of the backtrack run:",
        "",
        "```json",
        json.dumps(facts["config"], indent=2, sort_keys=True),
        "```",
    ]
    return "\n".join(lines) + "\n"
