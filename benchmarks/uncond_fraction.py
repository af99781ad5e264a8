"""Guided path nodes with and without a trained unconditional branch.

A text-to-image target is guided: D_w = D(x | empty) + w (D(x | prompt) - D(x | empty)). A path
node recorded on prompts alone never trains its unconditional branch, which then drifts with the
shared weights, and guidance multiplies that drift. This records the same path (one fixture
folder, its prompts, the same seed) with `--uncond-fraction` 0 and 0.1 and measures node N on a
fixed probe of noised G0 samples: its distance from the teacher unguided and guided at 1.75
(SD 1.x's default) and 8 (SDXL's), and how well each branch fits G0 (denoising loss on G0
samples drawn for their prompts, relative to the teacher's; the unconditional branch is asked
with the empty embedding). Not part of the test suite:

    python benchmarks/uncond_fraction.py --size small --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lora_path import SIZES
from t2i_fixtures import make_sd_folder, write_prompts

from disback_cli.config import RecordConfig
from disback_cli.method.dsm import denoising_weight
from disback_cli.method.generator import build_g0
from disback_cli.models.path_nodes import load_path_node
from disback_cli.models.teachers import open_teacher
from disback_cli.models.text_to_image.guidance import guided
from disback_cli.models.text_to_image.text import PromptSource, TextEncoder, read_prompts
from disback_cli.stages.record import run_record
from disback_cli.store.manifests import TrajectoryManifest, read_manifest

FRACTIONS = (0.0, 0.1)
SCALES = (1.75, 8.0)
PROBE = 256
SEED = 1234


def train_on_prompts(folder: Path, steps: int, caption_dropout: float = 0.1) -> None:
    """Give the fixture's random UNet a conditional and an unconditional branch worth guiding:
    trained as SD was (epsilon MSE, captions dropped at `caption_dropout`) on latents that each
    prompt fixes (prompt j: its own pattern plus noise), then saved back into the folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from disback_cli.models.text_to_image.folder import read_folder

    encoder = TextEncoder(read_folder(folder), "cpu")
    prompts = read_prompts(folder.parent / "prompts.txt")[0]
    with torch.no_grad():
        cond = encoder.encode(prompts)
    hidden, empty = cond["encoder_hidden_states"], cond["uncond_encoder_hidden_states"][:1]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").train()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    rng = torch.Generator().manual_seed(SEED)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    patterns = torch.randn(len(prompts), *shape, generator=rng).sign()
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    for _ in range(steps):
        j = torch.randint(len(prompts), (32,), generator=rng)
        x0 = patterns[j] + 0.3 * torch.randn(32, *shape, generator=rng)
        t = torch.randint(scheduler.config.num_train_timesteps, (32,), generator=rng)
        noise = torch.randn(x0.shape, generator=rng)
        drop = (torch.rand(32, generator=rng) < caption_dropout).reshape(-1, 1, 1)
        text = torch.where(drop, empty, hidden[j])
        pred = unet(scheduler.add_noise(x0, noise, t), t, text).sample
        loss = ((pred - noise) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"teacher trained: {steps} steps, last loss {loss.item():.4f}", flush=True)
    unet.eval().save_pretrained(folder / "unet")


@torch.no_grad()
def measure(trajectory: Path, prompts: str) -> dict:
    """Node N against the teacher on a fixed probe of noised G0 samples."""
    manifest = read_manifest(trajectory, TrajectoryManifest)
    teacher = open_teacher(manifest.teacher.source, "cpu")
    node = load_path_node(trajectory, manifest, manifest.last_node, teacher, "cpu")
    g0, _ = build_g0(manifest.g0, teacher, "cpu")
    source = PromptSource(TextEncoder(teacher.family.folder, "cpu"), read_prompts(prompts)[0])
    rng = torch.Generator().manual_seed(SEED)
    cond = source.draw(PROBE, rng, "cpu")
    z = torch.randn(PROBE, *teacher.spec.data_shape, generator=rng)
    x0 = g0(z, **cond)
    sigma = teacher.family.query_levels(teacher).sample(PROBE, rng, "cpu")
    x_t = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=rng)
    empty = PromptSource.unconditional_rows(cond, torch.ones(PROBE, dtype=torch.bool))
    weight = denoising_weight(teacher.denoiser, sigma).reshape(-1, 1, 1, 1)

    def fit(denoiser, which) -> float:
        return (weight * (denoiser(x_t, sigma, **which) - x0) ** 2).mean().item()

    result = {}
    for scale in (1.0, *SCALES):
        out_node = guided(node, scale)(x_t, sigma, **cond)
        out_teacher = guided(teacher.denoiser, scale)(x_t, sigma, **cond)
        result[f"distance_w{scale:g}"] = (out_node - out_teacher).abs().mean().item()
    for name, which in (("prompt", cond), ("unconditional", empty)):
        result[f"fit_{name}"] = fit(node, which) / fit(teacher.denoiser, which)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--train-teacher", type=int, default=600, help="steps that train the fixture (0: random)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_sd_folder(Path(tmp) / "sd", **SIZES[args.size])
        prompts = str(write_prompts(Path(tmp) / "prompts.txt"))
        if args.train_teacher:
            train_on_prompts(folder, args.train_teacher)
        for fraction in FRACTIONS:
            started = time.perf_counter()
            out = Path(tmp) / f"f{fraction}"
            cfg = RecordConfig(
                teacher=str(folder),
                prompts=prompts,
                iters=args.iters,
                nodes=2,
                batch=args.batch,
                lr=args.lr,
                uncond_fraction=fraction,
                device="cpu",
                threads=1,
            )
            run_record(cfg, out)
            row = {"uncond_fraction": fraction, **measure(out, prompts)}
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"uncond-fraction-{args.size}.json"
    path.write_text(json.dumps({**settings, "rows": rows}, indent=1))
    keys = [k for k in rows[0] if k not in ("uncond_fraction", "seconds")]
    lines = [
        f"| uncond fraction ({args.size}, {args.iters} iterations, lr {args.lr:g}) | "
        + " | ".join(keys)
        + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for row in rows:
        cells = " | ".join(f"{row[k]:.4g}" for k in keys)
        lines.append(f"| {row['uncond_fraction']:g} | {cells} |")
    (args.out / f"uncond-fraction-{args.size}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
