"""`disback doctor` on the CPU: every check runs and passes here, and a check that breaks is
reported as failed (exit code 1) in one line rather than crashing the command."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from disback_cli.stages import doctor, doctor_checks

CHECKS = list(doctor.CHECKS)
CPU = torch.device("cpu")


def skipping_all_but(*kept: str) -> list[str]:
    return [arg for name in CHECKS if name not in kept for arg in ("--skip", name)]


@pytest.fixture(autouse=True)
def one_thread():
    """No result depends on the thread count; one thread keeps the checks fast on a busy machine,
    where OpenMP threads spin against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_cpu_checks_pass_and_report_strict_json(cli):
    # inductor needs more than a minute on 2 CPU cores: compile is tested below without it
    result = cli("doctor", "--device", "cpu", "--json", "--skip", "compile")
    assert result.code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["device"] == "cpu"
    versions = report["versions"]
    assert versions["torch"] == torch.__version__
    assert versions["cuda"] == "none" and versions["gpus"] == []
    assert versions["nccl"] == "not available"
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == CHECKS
    assert all(c["status"] in {"ok", "failed", "skipped"} and c["detail"] for c in checks.values())
    assert checks["compile"]["status"] == "skipped"
    for name in ("bf16", "channels-last", "data-parallel", "fsdp"):
        assert checks[name]["status"] == "ok", checks[name]
        assert 0 <= checks[name]["relative_error"] <= checks[name]["tolerance"]
    assert checks["bf16"]["relative_error"] > 0  # bf16 really ran: its round-off shows
    assert checks["data-parallel"]["tolerance"] == doctor.ALLREDUCE_TOLERANCE
    assert checks["fsdp"]["tolerance"] == doctor.ALLREDUCE_TOLERANCE
    rate = checks["throughput"]["it_per_s_fp32"]
    assert checks["throughput"]["status"] == "ok" and math.isfinite(rate) and rate > 0


def test_the_plain_output_has_one_line_per_check(cli):
    result = cli("doctor", "--device", "cpu", *skipping_all_but("channels-last"))
    assert result.code == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    for name in CHECKS:
        (row,) = [row for row in rows if row[0] == name]
        assert row[1] == ("ok" if name == "channels-last" else "skipped")
    assert ["torch", torch.__version__] in rows and ["device", "cpu"] in rows


def test_a_compile_that_fails_is_reported_in_one_line_and_exits_1(cli, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("backend='inductor' raised:\nInvalidCxxCompiler: no C++ compiler\ng++")

    monkeypatch.setattr(torch, "compile", no_compiler)
    result = cli("doctor", "--device", "cpu", "--json", *skipping_all_but("compile"))
    assert result.code == 1 and result.stderr == ""
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["checks"][CHECKS.index("compile")] == {
        "name": "compile",
        "status": "failed",
        "detail": "RuntimeError: backend='inductor' raised: InvalidCxxCompiler: no C++ compiler",
    }


def test_the_compile_check_compares_compiled_with_eager_outputs(monkeypatch):
    monkeypatch.setenv("DISBACK_COMPILE_BACKEND", "eager")  # dynamo's tracing, no code generation
    check = doctor_checks.check_compile(doctor_checks.Workload.for_device(CPU), CPU)
    assert check.status == "ok" and check.detail.startswith("eager, built in")
    assert check.numbers["relative_error"] <= doctor_checks.FP32_TOLERANCE


def test_gradients_that_differ_fail_the_all_reduce_comparison():
    torch.manual_seed(0)
    full = [torch.randn(8, 3, 3), torch.randn(5)]
    assert doctor.gradients_match([g.clone() for g in full], full).status == "ok"
    halved = doctor.gradients_match([g / 2 for g in full], full)  # divided by the ranks twice
    assert halved.status == "failed" and halved.numbers["relative_error"] == pytest.approx(0.5)
    assert "exceeds" in halved.detail
    nudged = [full[0], full[1] + 1e-3 * full[1].norm() / math.sqrt(5)]
    assert doctor.gradients_match(nudged, full).status == "failed"
    assert doctor.gradients_match([full[0], full[1] * math.nan], full).status == "failed"
    assert doctor.gradients_match(full[:1], full).status == "failed"


def test_a_data_parallel_process_that_dies_fails_the_check(monkeypatch):
    monkeypatch.setattr(doctor, "RANK_COMMAND", "import sys; print('boom'); sys.exit(3)")
    check = doctor.check_data_parallel(doctor_checks.Workload.for_device(CPU), CPU)
    assert check.status == "failed"
    assert re.fullmatch("rank [01] exited with code 3: boom", check.detail)


def test_data_parallel_processes_that_hang_are_killed(monkeypatch):
    monkeypatch.setattr(doctor, "RANK_COMMAND", "import threading; threading.Event().wait()")
    monkeypatch.setattr(doctor, "DATA_PARALLEL_TIMEOUT", 1.0)
    check = doctor.check_data_parallel(doctor_checks.Workload.for_device(CPU), CPU)
    assert check.status == "failed" and "did not finish within 1 s" in check.detail


def test_a_rank_that_raises_leaves_its_error_in_one_line(tmp_path):
    with pytest.raises(SystemExit):
        doctor.rank_main("1", "gloo", str(tmp_path))  # no workload.json
    report = json.loads((tmp_path / "rank-1.json").read_text())
    assert report["error"].startswith("rank 1: FileNotFoundError: ")


def test_bad_flags_are_one_line_errors(cli):
    unknown = cli("doctor", "--skip", "speed")
    assert unknown.code == 2 and unknown.stderr.startswith("error: --skip speed: no such check")
    device = cli("doctor", "--device", "tpu")
    assert device.code == 2 and device.stderr.startswith("error: unknown device 'tpu'")


def test_the_compile_check_is_announced_before_it_starts(cli, monkeypatch):
    order = []

    def compile_later(*args, **kwargs):
        order.append("compiling")
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", compile_later)
    monkeypatch.setattr(
        "disback_cli.cli._common.console.print", lambda text, **kw: order.append(str(text))
    )
    result = cli("doctor", "--device", "cpu", *skipping_all_but("compile"))
    assert result.code == 1
    announced = [i for i, line in enumerate(order) if line.startswith("compile: torch.compile")]
    assert announced and announced[0] < order.index("compiling")
    assert "--skip compile" in order[announced[0]]
