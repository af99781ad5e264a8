"""What the command line knows of teachers before one is opened: the built-in teachers and the
defaults each kind of teacher sets. Data only, so that `--help` and flag errors need no torch;
the teacher families (`models.family`, `models.text_to_image.family`) choose the row that fits
the teacher they opened.
"""

from __future__ import annotations

from typing import Any

BUILTIN_PREFIX = "builtin:"
BUILTIN_TEACHERS = {
    "ring2d": "2-D ring of 8 Gaussians (MLP denoiser, 35k parameters)",
    "digits": "8x8 handwritten digits, class-conditional (small SongUNet, EDM preconditioning)",
    "shapes": "16x16 procedural shapes, 64 modes in 16 classes (small SongUNet, EDM precond.)",
}

# Defaults by teacher size: the toy ring wants fast rates, EDM U-Nets the rates their distillation
# papers used (SiD: lr 1e-5 for both networks, Adam with beta1 = 0, one fake-score step per
# generator step, EMA half-life 0.5 Mimg).
SIZE_DEFAULTS: dict[str, dict[str, Any]] = {
    "lr": {"vector": 1e-4, "image": 1e-4, "edm": 1e-5},  # record
    "lr_g": {"vector": 1e-4, "image": 5e-5, "edm": 1e-5},
    "lr_fake": {"vector": 1e-3, "image": 1e-4, "edm": 1e-5},
    "ema_halflife_kimg": {"vector": 10.0, "image": 10.0, "edm": 500.0},
    "fake_steps": {"vector": 1, "image": 1, "edm": 1},
    "optimizer": {"vector": "adam", "image": "adam", "edm": "adam"},
    "betas": {"vector": (0.0, 0.999), "image": (0.0, 0.999), "edm": (0.0, 0.999)},
    "weight_decay": {"vector": 0.0, "image": 0.0, "edm": 0.0},
}

# Defaults by text-to-image teacher, from the runs that distilled it: DMD2's SD 1.5 run (AdamW
# (0.9, 0.999), weight decay 0.01, both rates 1e-5, 10 fake-score steps per generator step) and
# the DisBack SDXL release (the same optimiser, 5e-7 for every network, 5 fake-score steps).
ADAMW = {"optimizer": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.01}
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "SD 1.x/2.x (DMD2 SD1.5)": {
        "lr": 1e-5,
        "lr_g": 1e-5,
        "lr_fake": 1e-5,
        "fake_steps": 10,
        **ADAMW,
        "ema_halflife_kimg": 10.0,
    },
    "SDXL (DisBack SDXL)": {
        "lr": 5e-7,
        "lr_g": 5e-7,
        "lr_fake": 5e-7,
        "fake_steps": 5,
        **ADAMW,
        "ema_halflife_kimg": 10.0,
    },
}


def defaults_by_kind(key: str) -> dict[str, Any]:
    """{teacher kind: value} of a setting the teacher decides, as `--help` lists it."""
    by_size = SIZE_DEFAULTS.get(key, {})
    by_text = {kind: values[key] for kind, values in TEXT_DEFAULTS.items() if key in values}
    return {**by_size, **by_text}
