"""Experiment trackers researchers already use, fed the same lines as metrics.jsonl.

metrics.jsonl stays the source of truth (resume cuts it back to the resume point, `plot` and `runs`
read it); a tracker mirrors each line as it is written. Both are optional extras:

    pip install "disback[tensorboard]"   # event files in RUN/tensorboard/
    pip install "disback[wandb]"         # a W&B run; WANDB_MODE=offline keeps it on disk

A resumed run continues the same W&B run (its id comes from the run directory and creation
time) and writes its TensorBoard events into the same folder, `tensorboard/<creation time>/`,
which TensorBoard shows as one run; a run restarted with `--force` is a new run in both. Lines
written after the last resume point and before a kill are sent again on resume: trackers show
those iterations twice, metrics.jsonl once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

from disback_cli.errors import ConfigError, DisbackError, summary_of
from disback_cli.store.layout import check_no_links

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_FOLDER = "tensorboard"
WANDB_FOLDER = "wandb"


class Tracker(Protocol):
    def log(self, iteration: int, line: dict) -> None: ...

    def close(self) -> None: ...


def scalars(line: dict) -> dict[str, float]:
    """A metrics line as flat scalar tags: `loss_g`, `eval/mmd2`, `mismatch/cosine`, ..."""
    flat = {k: v for k, v in line.items() if not isinstance(v, dict)}
    for group, values in line.items():
        if isinstance(values, dict):
            flat.update({f"{group}/{k}": v for k, v in values.items()})
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float))}


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict, created_at: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--log-to tensorboard needs the tensorboard package: "
                "pip install 'disback[tensorboard]'"
            ) from None
        started = "".join(c for c in created_at[:19] if c.isdigit() or c == "T")
        log_dir = check_no_links(run_dir, f"{TENSORBOARD_FOLDER}/{started}")
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", f"```\n{json.dumps(config, indent=1)}\n```", 0)

    def log(self, iteration: int, line: dict) -> None:
        for tag, value in scalars(line).items():
            self.writer.add_scalar(tag, value, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, created_at: str) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "--log-to wandb needs the wandb package: pip install 'disback[wandb]'"
            ) from None
        check_no_links(run_dir, WANDB_FOLDER)
        identity = f"{run_dir.absolute()}|{created_at}".encode()
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "disback"),
                name=f"{run_dir.parent.parent.name}/{run_dir.name}",
                id=hashlib.sha256(identity).hexdigest()[:16],
                resume="allow",
                dir=str(run_dir),
                config=config,
            )
        except Exception as exc:  # no credentials, no network, a bad setting: say which
            first = summary_of(exc)
            raise DisbackError(
                f"--log-to wandb: {first} (log in with `wandb login`, or set WANDB_MODE=offline)"
            ) from None

    def log(self, iteration: int, line: dict) -> None:
        self.run.log(scalars(line), step=iteration)

    def close(self) -> None:
        self.run.finish()


def check_tracker_folders(names: list[str], run_dir: Path) -> None:
    """The folders the trackers write in must be the run's own (no link to elsewhere): checked
    before the run starts, so a refusal leaves the run as it was."""
    for name in names:
        if name in (TENSORBOARD_FOLDER, WANDB_FOLDER) and run_dir.is_dir():
            check_no_links(run_dir, name)


def open_trackers(names: list[str], run_dir: Path, config: dict, created_at: str) -> list[Tracker]:
    trackers: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, config, created_at))
        elif name == "wandb":
            trackers.append(WandbTracker(run_dir, config, created_at))
        else:
            raise ConfigError(f"--log-to {name!r}: unknown tracker (known: {', '.join(TRACKERS)})")
    return trackers
