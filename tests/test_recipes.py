"""Every recipe in recipes/ loads and validates; the paper-scale recipes document their sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from disback_cli.config import BacktrackConfig, RecordConfig, SampleConfig
from disback_cli.config.recipes import build_config, read_recipe
from disback_cli.config.teacher_train import TeacherTrainConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.toml"))

# Command table -> the model its command validates it with (see disback_cli/cli/*.py).
SECTIONS = {
    "record": RecordConfig,
    "backtrack": BacktrackConfig,
    "sample": SampleConfig,
    "teacher_train": TeacherTrainConfig,
}

# Paper-scale recipes and the EDM release pickle each one distils.
PAPER_SCALE = {
    "cifar10-uncond": "edm-cifar10-32x32-uncond-vp.pkl",
    "cifar10-cond": "edm-cifar10-32x32-cond-vp.pkl",
    "ffhq64": "edm-ffhq-64x64-uncond-vp.pkl",
    "afhqv2-64": "edm-afhqv2-64x64-uncond-vp.pkl",
    "imagenet64": "edm-imagenet-64x64-cond-adm.pkl",
}


# Text-to-image recipes and the diffusers folder each one distils.
TEXT_TO_IMAGE = {
    "sd15": "stable-diffusion-v1-5",
    "sd15-sid-lsg": "stable-diffusion-v1-5",
    "sdxl": "stable-diffusion-xl-base-1.0",
}


def _tables(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _header(path: Path) -> str:
    """The comment block at the top of the file, up to the first line that is not a comment."""
    lines = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _key_lines(path: Path) -> list[str]:
    """Non-blank lines that are neither comments nor [table] headers."""
    return [
        line
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "["))
    ]


def test_recipes_found():
    assert RECIPES, f"no recipes in {RECIPES_DIR}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path: Path):
    tables = _tables(path)
    unknown = set(tables) - set(SECTIONS)
    assert not unknown, f"{path.name}: unknown top-level keys or tables {sorted(unknown)}"
    present = [section for section in SECTIONS if section in tables]
    assert present, f"{path.name}: none of the tables {sorted(SECTIONS)}"
    for section in present:
        assert read_recipe(path, section) == tables[section]
        build_config(SECTIONS[section], path, section, {})  # raises ConfigError if invalid


def test_paper_scale_recipes_exist():
    missing = [name for name in PAPER_SCALE if not (RECIPES_DIR / f"{name}.toml").is_file()]
    assert not missing, f"missing paper-scale recipes: {missing}"


@pytest.mark.parametrize("name", sorted(PAPER_SCALE))
def test_paper_scale_recipe_is_documented(name: str):
    path = RECIPES_DIR / f"{name}.toml"
    tables = _tables(path)
    assert {"record", "backtrack", "sample"} <= set(tables)
    assert tables["record"]["teacher"] == PAPER_SCALE[name]

    undocumented = [line for line in _key_lines(path) if "# source:" not in line]
    assert not undocumented, f"{path.name}: lines without '# source:': {undocumented}"

    header = _header(path)
    for phrase in ("torchrun", "GPU-hours", PAPER_SCALE[name], "PER RANK"):
        assert phrase in header, f"{path.name}: the header comment does not mention {phrase!r}"


@pytest.mark.parametrize("name", sorted(TEXT_TO_IMAGE))
def test_text_to_image_recipe_is_documented(name: str):
    path = RECIPES_DIR / f"{name}.toml"
    tables = _tables(path)
    assert {"record", "backtrack", "sample"} <= set(tables)
    assert tables["record"]["teacher"] == TEXT_TO_IMAGE[name]
    assert "prompts" in tables["record"] and "guidance_scale" in tables["backtrack"]
    undocumented = [line for line in _key_lines(path) if "# source:" not in line]
    assert not undocumented, f"{path.name}: lines without '# source:': {undocumented}"
    header = _header(path)
    for phrase in ("torchrun", "PER RANK", "Memory", "80 GB", "GAN"):
        assert phrase in header, f"{path.name}: the header comment does not mention {phrase!r}"
