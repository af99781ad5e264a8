"""Score gap at the first `--no-trajectory` iteration with dropout forced on the trained copies.

There the fake score starts as the teacher, so mean |D_fake - D_target| and the generator's
gradient must be exactly 0 whatever dropout the trained copies use. The digits teacher (no
dropout of its own) runs with `--dropout 0.13`, EDM's CIFAR-10 rate, one iteration per loss:

    python benchmarks/dropout_gap.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from disback_cli.config import BacktrackConfig, RecordConfig
from disback_cli.stages.backtrack import run_backtrack
from disback_cli.stages.record import run_record
from disback_cli.store.layout import backtrack_dir


def main() -> None:
    trajectory = Path(tempfile.mkdtemp(prefix="disback-dropout-")) / "digits"
    run_record(
        RecordConfig(teacher="builtin:digits", iters=10, nodes=1, batch=64, device="cpu"),
        trajectory,
    )
    for loss in ("vsd", "dmd", "sid"):
        cfg = BacktrackConfig(
            no_trajectory=True,
            loss=loss,
            dropout=0.13,
            iters=1,
            batch=64,
            log_every=1,
            save_every=0,
            device="cpu",
        )
        run_backtrack(cfg, trajectory, loss)
        line = json.loads((backtrack_dir(trajectory, loss) / "metrics.jsonl").read_text())
        print(f"{loss}: score_gap {line['score_gap']:.4g}, grad_norm_g {line['grad_norm_g']:.4g}")


if __name__ == "__main__":
    main()
