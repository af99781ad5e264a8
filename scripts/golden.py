"""Golden outputs: fixed short runs through the CLI, and the sha256 of every file they write.

A refactor that must not change behaviour is checked by running this before and after and
comparing: `python scripts/golden.py run OUT` writes OUT/golden.json; `python scripts/golden.py
compare A/golden.json B/golden.json` lists every difference. Fixtures (an EDM pickle with dropout,
tiny Stable Diffusion folders) are made once in OUT/../fixtures and reused, so both runs read the
same teacher bytes. Manifests and metrics are hashed without their wall-clock fields; everything
else byte for byte. Same machine, same thread count (OMP_NUM_THREADS=1 is set here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLOCK_KEYS = {
    "created_at",
    "updated_at",
    "elapsed_seconds",
    "seconds",
    "disback_version",
    "samples_per_second",
    "total_seconds",
    "stage_seconds",
}


def disback(command: str, torchrun: int = 0) -> str:
    """Run `disback COMMAND` (a shell-like string) and return its stdout; stop on failure."""
    args = shlex.split(command)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    if torchrun:
        launch = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={torchrun}"]
        args = [*launch, "-m", "disback_cli", *args]
    else:
        args = [str(BIN / "disback"), *args]
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    print(f"{time.perf_counter() - started:6.1f} s  disback {command}", flush=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {command}\n{done.stderr[-3000:]}")
    return done.stdout


def fixtures(where: Path) -> dict[str, Path]:
    """The input files, made once (so both sides of a comparison read the same bytes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    paths = {
        "edm": where / "edm-dropout.pkl",
        "sd": where / "sd",
        "sdxl": where / "sdxl",
        "prompts": where / "prompts.txt",
    }
    if paths["prompts"].exists():
        return paths
    where.mkdir(parents=True, exist_ok=True)
    from edm_fixtures import tiny_network, write_edm_snapshot
    from t2i_fixtures import make_sd_folder, write_prompts

    net, kwargs = tiny_network("ddpmpp", "edm", label_dim=3, dropout=0.1)
    write_edm_snapshot(paths["edm"], net, kwargs)
    make_sd_folder(paths["sd"])
    make_sd_folder(paths["sdxl"], xl=True, prediction="v_prediction")
    write_prompts(paths["prompts"])
    return paths


def run(out: Path) -> None:
    out.mkdir(parents=True)
    fx = {k: shlex.quote(str(v)) for k, v in fixtures(out.parent / "fixtures").items()}
    o = shlex.quote(str(out))
    reports: dict[str, str] = {}
    ring = (
        f"-T {o}/ring --iters 40 --interval 10 --save-every 20 --log-every 10 --batch 64 --seed 0"
    )
    disback(
        f"record --teacher builtin:ring2d --out {o}/ring --iters 60 --nodes 3 --batch 64 --seed 0"
    )
    disback(f"backtrack {ring} --eval-every 20 --set eval_samples=200")
    disback(f"backtrack {ring} --loss dmd --dsm-sigma lognormal --name dmd")
    disback(f"backtrack {ring} --loss sid --name sid")
    adaptive = "--switch adaptive --switch-patience 3 --mismatch-every 20"
    disback(f"backtrack {ring} {adaptive} --name adaptive")
    disback(f"backtrack {ring} --no-trajectory --name baseline")
    disback(f"backtrack {ring} --loss diffratio --data builtin:ring2d --name ratio")
    disback(f"backtrack {ring} --iters 60 --name default")  # extends
    disback(f"sample -T {o}/ring -n 300 --out {o}/ring.npz")
    verifier = f"--best-of 4 --verifier {o}/ring/backtrack/ratio"
    disback(f"sample -T {o}/ring --name ratio -n 50 {verifier} --out {o}/best.npz")
    reports["evaluate ring"] = disback(f"evaluate {o}/ring.npz --json")
    disback(f"sample --teacher builtin:ring2d --steps 6 -n 100 --out {o}/ring-teacher.npz")

    digits = f"-T {o}/digits --batch 8 --seed 1"
    disback(
        f"record --teacher builtin:digits --out {o}/digits --iters 12 --nodes 2 --batch 8 --seed 1"
    )
    disback(
        f"backtrack {digits} --iters 10 --interval 4 --save-every 5 --log-every 5 --eval-every 10 "
        "--set eval_samples=100"
    )
    disback(
        f"backtrack {digits} --iters 6 --loss diffratio --data builtin:digits --name ratio "
        "--log-every 3 --save-every 3"
    )
    disback(f"sample -T {o}/digits -n 40 --format png --grid --out {o}/digits-png")
    reports["evaluate digits"] = disback(f"evaluate {o}/digits-png --json")

    edm = f"-T {o}/edm --iters 4 --interval 2 --log-every 2 --save-every 2 --batch 4 --seed 2"
    disback(f"record --teacher {fx['edm']} --out {o}/edm --iters 6 --nodes 2 --batch 4 --seed 2")
    disback(f"backtrack {edm}")
    disback(f"backtrack {edm} --loss sid --dropout 0 --name sid")
    disback(f"sample -T {o}/edm -n 6 --format npz --class 1 --out {o}/edm.npz")

    prompts = f"--prompts {fx['prompts']}"
    for name, extra in (("sd", ""), ("sd-lora", "--lora-rank 2")):
        disback(
            f"record --teacher {fx['sd']} {prompts} --out {o}/{name} --iters 4 --nodes 2 --batch 2 "
            + extra
        )
        disback(
            f"backtrack -T {o}/{name} --iters 4 --interval 2 --batch 2 --log-every 2 --save-every 2"
        )
        disback(f"sample -T {o}/{name} {prompts} -n 1 --out {o}/{name}-png")
    disback(
        f"record --teacher {fx['sdxl']} {prompts} --out {o}/sdxl --iters 2 --nodes 1 --batch 2 "
        "--timestep 399"
    )
    disback(f"backtrack -T {o}/sdxl --iters 2 --batch 2 --log-every 1 --save-every 2 --loss dmd")
    disback(f"sample -T {o}/sdxl {prompts} -n 1 --format npz --out {o}/sdxl.npz")
    disback(
        f"sample --teacher {fx['sd']} {prompts} --steps 3 --guidance-scale 2 -n 1 --format npz "
        f"--out {o}/sd-teacher.npz"
    )

    two = f"{o}/ring-2proc"
    disback(f"record --teacher builtin:ring2d --out {two} --iters 40 --nodes 2 --batch 32", 2)
    disback(
        f"backtrack -T {two} --iters 20 --interval 5 --batch 32 --log-every 5 --save-every 10", 2
    )
    disback(f"sample -T {two} -n 100 --out {o}/ring-2proc.npz", 2)

    if os.environ.get("GOLDEN_DEMO", "1") == "1":
        reports["demo"] = disback(f"demo --out {o}/demo --json")
    hashes = {
        str(path.relative_to(out)): digest(path)
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }
    for key, text in reports.items():
        report = json.dumps(scrub(json.loads(text)), sort_keys=True)
        hashes[f"stdout: {key}"] = hashlib.sha256(report.encode()).hexdigest()
    (out / "golden.json").write_text(json.dumps(hashes, indent=1, sort_keys=True))
    print(f"{len(hashes)} files hashed into {out / 'golden.json'}")


def scrub(value):
    """JSON without its wall-clock fields."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in CLOCK_KEYS}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(scrub(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".jsonl":
        lines = [scrub(json.loads(line)) for line in data.decode().splitlines() if line.strip()]
        data = json.dumps(lines, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def rehash(out: Path, golden: Path) -> None:
    """Recompute the file entries of `golden` from the tree `out` (after a change to `digest`)."""
    hashes = json.loads(golden.read_text())
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name not in (".lock", "golden.json"):
            hashes[str(path.relative_to(out))] = digest(path)
    golden.write_text(json.dumps(hashes, indent=1, sort_keys=True))


def compare(a: Path, b: Path) -> int:
    old, new = json.loads(a.read_text()), json.loads(b.read_text())
    differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    for key in differ:
        print(f"{'differs' if key in old and key in new else 'only in one'}: {key}")
    print(f"{len(old)} vs {len(new)} entries, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["rehash"]:
        rehash(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["compare"]:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
