"""Progress off a terminal (issue 32, in part): a run whose stderr goes to a file logs plain
progress lines, with the evaluation metric when one is measured, and a closing line with the
final values; the TTY bar keeps showing the last evaluation."""

from __future__ import annotations

import json
import re
import shutil

from conftest import checkout_env, launch
from disback_cli.cli._common import LogReporter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_by_time_by_measurement_and_at_the_end(capsys):
    clock = Clock()
    reporter = LogReporter(every=30, clock=clock)
    reporter.start("backtrack", 100, 0)
    for step in range(10, 101, 10):
        clock.now = step  # one second per iteration
        fields = {"loss_g": 1 / step}
        if step == 50:
            fields["mmd2"] = 0.25  # an evaluation
        reporter.advance(step, **fields)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == [
        "30/100",
        "50/100",
        "80/100",
        "done,",
    ]
    assert "mmd2 0.25" in lines[1] and "mmd2" not in lines[0]
    assert "1 it/s" in lines[0] and "ETA 1m10s" in lines[0]
    assert lines[-1].startswith("backtrack: done, 100/100 in 1m40s") and "mmd2 0.25" in lines[-1]


def backtrack_logged(small_trajectory, tmp_path, *flags: str, **launched):
    """`disback backtrack` on a copy of the ring trajectory, stderr a pipe (not a terminal)."""
    traj = tmp_path / "t"
    shutil.copytree(small_trajectory, traj)
    done = launch(
        tmp_path,
        *("backtrack", "-T", traj, "--device", "cpu", *flags),
        env=checkout_env(OMP_NUM_THREADS="1"),
        **launched,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_backtrack_logged_to_a_file_shows_progress_and_its_final_metrics(
    small_trajectory, tmp_path
):
    flags = ("--iters", "20", "--interval", "5", "--batch", "64", "--eval-every", "10")
    done = backtrack_logged(small_trajectory, tmp_path, *flags, "--log-every", "5", fresh=True)
    progress = [line for line in done.stderr.splitlines() if line.startswith("backtrack")]
    measured = [line for line in progress if re.search(r"mmd2 [-0-9.e]+", line)]
    assert any(": 10/20 (50%)" in line for line in measured), done.stderr
    evaluating = progress.index("backtrack default: iteration 10: evaluating the EMA generator")
    assert ": 10/20 (50%)" in progress[evaluating + 1]  # said before, measured after
    assert re.search(r"^G0 \(iteration 0\): mmd2 [-0-9.e]+", done.stderr, re.M), done.stderr
    assert progress[-1].startswith("backtrack default: done, 20/20 in"), done.stderr
    assert "loss_g" in progress[-1] and "mmd2" in progress[-1]
    assert "complete at iteration 20" in done.stdout and "mmd2" in done.stdout  # closing line
    memory = next(line for line in done.stderr.splitlines() if line.startswith("memory per"))
    assert memory.endswith("(prefetched))")  # a message is one line in a log, never wrapped


def test_record_says_what_it_builds_before_its_first_iteration(tmp_path):
    from conftest import run_cli

    args = ("--teacher", "builtin:ring2d", "--iters", "4", "--nodes", "2", "--batch", "4")
    result = run_cli("record", *args, "--probe-samples", "40", "--out", tmp_path / "t")
    assert result.code == 0, result.stderr
    lines = result.stderr.splitlines()
    progress = [line for line in lines if line.startswith("record")]
    assert progress[-1].startswith("record: done, 4/4 in")  # the closing line, after the nodes
    said = lines.index("path probe: 40 G0 samples through G0 and the teacher (chunks of 4)")
    built = next(i for i, line in enumerate(lines) if line.startswith("path probe: done, 20/20 in"))
    assert said < built < next(i for i, ln in enumerate(lines) if ln.startswith("record: done"))
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["config"]["probe_samples"] == 40


def test_under_torchrun_rank_0_alone_logs_progress(small_trajectory, tmp_path):
    flags = ("--iters", "6", "--interval", "2", "--batch", "16", "--log-every", "2")
    done = backtrack_logged(small_trajectory, tmp_path, *flags, processes=2)
    closing = [ln for ln in done.stderr.splitlines() if ln.startswith("backtrack default: done")]
    assert len(closing) == 1, done.stderr[-3000:]


def test_the_terminal_bar_shows_each_phase_until_the_loop_moves_on():
    import io

    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from disback_cli.cli._common import RichReporter

    console = Console(file=io.StringIO(), force_terminal=True)
    with Progress(TextColumn("{task.description}"), console=console) as progress:
        reporter = RichReporter(progress)
        reporter.phase("opening the teacher builtin:ring2d")  # before any loop: a bar of its own
        assert [(t.description, t.total) for t in progress.tasks] == [
            ("opening the teacher builtin:ring2d", None)
        ]
        reporter.start("backtrack", 20, 0)  # ...which the loop's bar replaces
        assert [t.description for t in progress.tasks] == ["backtrack"]
        reporter.advance(10, loss_g=0.5)
        reporter.phase("iteration 10: evaluating the EMA generator")
        assert progress.tasks[0].fields["info"] == "iteration 10: evaluating the EMA generator"
        reporter.advance(10, loss_g=0.5, mmd2=0.25)
        assert progress.tasks[0].fields["info"] == "loss_g 0.5  mmd2 0.25"
        reporter.advance(20, loss_g=0.25)
        reporter.phase("saving path node 2")  # after the end: the bar keeps its final values
        assert progress.tasks[0].fields["info"] == "loss_g 0.25  mmd2 0.25"
