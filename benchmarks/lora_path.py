"""How far a recorded path moves from the teacher: full weights against low-rank adapters.

One text-to-image teacher built by the tests' fixture builder (random weights: what is compared is
how far the same recording moves each kind of node, not image quality), one prompt file, the
same recording (iterations, batch, seed) as full weights at the family's default rate and as
rank-r adapters at their default rate (full rate x 100 / sqrt(r)) and at the full-weight rate.
Reported per node: mean |D_node - D_teacher| on the probe, and the denoising loss on G0 relative
to the teacher's (below 1: it fits G0 better). Not part of the test suite:

    python benchmarks/lora_path.py --size small --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from t2i_fixtures import make_sd_folder, write_prompts

from disback_cli.config import RecordConfig
from disback_cli.stages.record import run_record

SIZES = {  # make_sd_folder arguments: UNet channels per level, latent side, text width
    "tiny": dict(widths=(8, 16)),  # the tests' folder
    "small": dict(widths=(64, 128), latent=16, text_width=64),
    "sd-like": dict(widths=(192, 384, 768), latent=32, text_width=768, text_layers=4),
}
RANKS = (4, 16, 64)


def adapter_arms(full_rate: float) -> dict[str, dict]:
    """Name -> the adapter recordings' extra settings (`full_rate`: the full-weight run's)."""
    found: dict[str, dict] = {}
    for rank in RANKS:
        found[f"rank {rank}, default rate"] = {"lora_rank": rank}
        found[f"rank {rank}, full-weight rate"] = {"lora_rank": rank, "lr": full_rate}
    return found


def record(common: dict, extra: dict, out: Path) -> dict:
    started = time.perf_counter()
    manifest = run_record(RecordConfig(**common, **extra), out)
    teacher_loss = manifest.nodes[0].g0_loss
    return {
        "lr": manifest.config.lr,
        "distance": [n.dist_to_teacher for n in manifest.nodes],
        "g0_loss_vs_teacher": [n.g0_loss / teacher_loss for n in manifest.nodes],
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_sd_folder(Path(tmp) / "sd", **SIZES[args.size])
        prompts = write_prompts(Path(tmp) / "prompts.txt")
        common = dict(
            teacher=str(folder),
            prompts=str(prompts),
            iters=args.iters,
            nodes=args.nodes,
            batch=args.batch,
            device="cpu",
            threads=1,
        )
        rows.append({"arm": "full weights, default rate", **record(common, {}, Path(tmp) / "full")})
        for name, extra in adapter_arms(rows[0]["lr"]).items():
            rows.append({"arm": name, **record(common, extra, Path(tmp) / f"run{len(rows)}")})
        for row in rows:
            print(
                f"{row['arm']}: lr {row['lr']:.3g}, node {args.nodes} distance "
                f"{row['distance'][-1]:.4g}, G0 loss vs teacher "
                f"{row['g0_loss_vs_teacher'][-1]:.4f} ({row['seconds']:.0f} s)",
                flush=True,
            )
    result = {"size": args.size, **{k: v for k, v in vars(args).items() if k != "out"}}
    result["rows"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lora-path-{args.size}.json").write_text(json.dumps(result, indent=1))
    full = rows[0]["distance"][-1]
    lines = [
        f"| arm ({args.size}, {args.iters} iterations, batch {args.batch}) | lr | "
        "node N distance | share of full weights' | node N G0 loss vs teacher |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['arm']} | {row['lr']:.3g} | {row['distance'][-1]:.4g} | "
            f"{row['distance'][-1] / full:.2f} | {row['g0_loss_vs_teacher'][-1]:.4f} |"
        )
    (args.out / f"lora-path-{args.size}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
