"""`disback doctor`: versions and a short self-check of this machine, for bug reports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from disback_cli.cli._common import DeviceOpt, JsonOpt, console, emit_json, stdout
from disback_cli.errors import ConfigError

if TYPE_CHECKING:
    from disback_cli.stages.doctor_checks import Check


def _show_versions(info: dict[str, Any]) -> None:
    for key, value in info.items():
        if key == "gpus":
            value = "; ".join(f"{g['index']}: {g['name']}, {g['memory_gib']} GiB" for g in value)
            value = f"{len(info['gpus'])} ({value})" if value else "none"
        stdout.print(f"{key:<14} {value}", markup=False)


def _show(check: Check) -> None:
    stdout.print(f"{check.name:<14} {check.status} ({check.detail})", markup=False)


def doctor(
    device: DeviceOpt = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(help="Leave out a check by the name doctor prints, e.g. compile; repeatable."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Print versions and check this machine: bf16 autocast against fp32, torch.compile and
    channels-last against eager, backtrack iterations per second, and 2-process data-parallel
    gradients against one process. About a minute on a GPU; attach the output to bug reports.

    Each check prints ok, failed (with the reason) or skipped; the exit code is 1 if one failed.
    CUDA runs EDM's CIFAR-10 network at batch 64; the CPU a small one. torch.compile's kernel
    build dominates: minutes on a CPU (it is announced first; --skip compile leaves it out).

    Example: disback doctor --device cuda --json > doctor.json
    """
    from disback_cli.runtime.devices import resolve_device
    from disback_cli.stages.doctor import CHECKS, run_checks, versions
    from disback_cli.stages.doctor_checks import Workload

    unknown = [name for name in skip or [] if name not in CHECKS]
    if unknown:
        raise ConfigError(f"--skip {unknown[0]}: no such check (known: {', '.join(CHECKS)})")
    resolved = resolve_device(device or "auto")
    work = Workload.for_device(resolved)
    info = versions()
    if not json_out:
        _show_versions({**info, "device": str(resolved), "network": work.describe()})
    checks = []
    announce = (lambda text: None) if json_out else (lambda text: console.print(text, markup=False))
    for check in run_checks(work, resolved, skip or (), announce):
        checks.append(check)
        if not json_out:
            _show(check)
    ok = all(check.status != "failed" for check in checks)
    if json_out:
        emit_json(
            {
                "versions": info,
                "device": str(resolved),
                "network": work.describe(),
                "checks": [check.to_json() for check in checks],
                "ok": ok,
            }
        )
    if not ok:
        raise typer.Exit(1)
