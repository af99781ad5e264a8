"""Recipes and `--set`: how a run's config is built from defaults < a TOML recipe < flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic import BaseModel, ValidationError

from disback_cli.errors import ConfigError, DisbackError, describe_validation_error
from disback_cli.store.fileio import read_regular_file

ConfigT = TypeVar("ConfigT", bound=BaseModel)


RECIPE_TABLES = ("record", "backtrack", "sample", "export", "teacher_train")
MAX_RECIPE_BYTES = 1 << 20


def read_recipe(path: str | Path, section: str) -> dict[str, Any]:
    """The `[section]` table of a TOML recipe, or the whole file if it has no command tables.

    Tables other than the commands' and keys outside any table are refused, so a misspelt table
    name cannot silently drop its settings."""
    try:
        data = tomllib.loads(read_regular_file(path, MAX_RECIPE_BYTES, "recipe").decode())
    except DisbackError as exc:
        raise ConfigError(str(exc).replace("no such file", "recipe file not found")) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not a valid TOML recipe ({exc})") from None
    tables = [k for k, v in data.items() if isinstance(v, dict)]
    if not tables:
        return data
    unknown = [k for k in tables if k not in RECIPE_TABLES]
    if unknown:
        raise ConfigError(
            f"{path}: unknown table [{unknown[0]}] (known: {', '.join(RECIPE_TABLES)})"
        )
    loose = [k for k in data if k not in tables]
    if loose:
        raise ConfigError(f"{path}: key {loose[0]!r} is outside any table; put it in one")
    return data.get(section, {})


MAX_SETTINGS = 200  # --set options in one command


def parse_settings(settings: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` options as config values: VALUE is read as TOML (`0.3`, `true`,
    `[0.9, 0.99]`, `"text"`), or taken as text when it is not TOML (`--set device=cpu`). Keys may
    use '-' for '_'; each key once."""
    values: dict[str, Any] = {}
    for setting in (settings or [])[: MAX_SETTINGS + 1]:
        key, sep, text = setting.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--set {setting!r:.80}: expected KEY=VALUE, e.g. ema_rampup=0.3")
        if key in values:
            raise ConfigError(f"--set {key}: given twice")
        try:
            values[key] = tomllib.loads(f"value = {text}")["value"]
        except (tomllib.TOMLDecodeError, RecursionError):
            values[key] = text
    if len(values) > MAX_SETTINGS:
        raise ConfigError(f"more than {MAX_SETTINGS} --set options")
    return values


def build_config(
    model: type[ConfigT],
    recipe: str | Path | None,
    section: str,
    flags: dict[str, Any],
    settings: list[str] | None = None,
) -> ConfigT:
    """Defaults < recipe < flags and `--set KEY=VALUE` (flags left as None are not given; a key
    set both ways is refused)."""
    values = read_recipe(recipe, section) if recipe else {}
    from_recipe = set(values)
    given = {k: v for k, v in flags.items() if v is not None}
    extra = parse_settings(settings)
    both = sorted(set(given) & set(extra))
    if both:
        raise ConfigError(f"--set {both[0]} and its own flag were both given; keep one")
    given.update(extra)
    values.update(given)
    try:
        cfg = model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    cfg._recipe_keys = frozenset(from_recipe - set(given))
    return cfg
