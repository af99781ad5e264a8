"""Recipes and `--set`: how a run's config is built from defaults < a TOML recipe < flags."""

from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any, TypeVar

import tomllib
from pydantic import BaseModel, ValidationError

from disback_cli.errors import ConfigError, DisbackError
from disback_cli.store.fileio import read_regular_file

ConfigT = TypeVar("ConfigT", bound=BaseModel)


RECIPE_TABLES = ("record", "backtrack", "sample", "export", "teacher_train")
MAX_RECIPE_BYTES = 1 << 20


def _read_recipe_file(path: str | Path) -> tuple[dict[str, Any], bool, str]:
    """A TOML recipe's content, whether it has command tables, and the sha256 of its bytes.

    Tables other than the commands' and keys outside any table are refused, so a misspelt table
    name cannot silently drop its settings."""
    try:
        raw = read_regular_file(path, MAX_RECIPE_BYTES, "recipe")
        data = tomllib.loads(raw.decode())
    except DisbackError as exc:
        raise ConfigError(str(exc).replace("no such file", "recipe file not found")) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not a valid TOML recipe ({exc})") from None
    sha256 = hashlib.sha256(raw).hexdigest()
    tables = [k for k, v in data.items() if isinstance(v, dict)]
    if not tables:
        return data, False, sha256
    unknown = [k for k in tables if k not in RECIPE_TABLES]
    if unknown:
        raise ConfigError(
            f"{path}: unknown table [{unknown[0]}] (known: {', '.join(RECIPE_TABLES)})"
        )
    loose = [k for k in data if k not in tables]
    if loose:
        raise ConfigError(f"{path}: key {loose[0]!r} is outside any table; put it in one")
    return data, True, sha256


def read_recipe(path: str | Path, section: str) -> dict[str, Any]:
    """The `[section]` table of a TOML recipe, or the whole file if it has no command tables."""
    data, has_tables, _ = _read_recipe_file(path)
    return data.get(section, {}) if has_tables else data


def recipe_table(
    model: type[BaseModel], path: str | Path, section: str
) -> tuple[dict[str, Any], str] | None:
    """A recipe's own `[section]` table (None if it has none) and the file's sha256, checked as
    `model`'s recipe layer now: a command that records another command's table for later
    (backtrack, its [sample]) refuses a typo at once rather than when the table is used."""
    data, has_tables, sha256 = _read_recipe_file(path)
    if not has_tables or section not in data:
        return None
    build_config(model, None, section, {}, layer=(f"{path} [{section}]", data[section]))
    return data[section], sha256


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
            raise ConfigError(f"--set {setting!r:.80}: expected KEY=VALUE, e.g. device=cpu")
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
    *,
    layer: tuple[str, dict[str, Any]] | None = None,
) -> ConfigT:
    """Defaults < recipe < flags and `--set KEY=VALUE` (flags left as None are not given; a key
    set both ways is refused). `layer`, (where it is from, table), is a recipe table found
    elsewhere (a run's recorded [sample]), used as the recipe layer instead of `recipe`."""
    where = f"{recipe} [{section}]"
    if layer is not None:
        where, values = layer[0], dict(layer[1])
    else:
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
        sources = dict.fromkeys(from_recipe, where) | dict.fromkeys(extra, "--set")
        raise ConfigError(_explained(model, exc, sources)) from None
    cfg._recipe_keys = frozenset(from_recipe - set(given))
    return cfg


def _flag(model: type[BaseModel], key: str) -> str:
    """A field's flag as the user types it (see `cli.options`)."""
    extra = model.model_fields[key].json_schema_extra if key in model.model_fields else None
    flags = extra.get("flags") if isinstance(extra, dict) else None
    if flags == []:
        return f"--set {key}"
    return flags[0] if flags else "--" + key.replace("_", "-")


def _explained(model: type[BaseModel], exc: ValidationError, sources: dict[str, str]) -> str:
    """A config's validation errors in the words the user typed: a missing value by its flag,
    an unknown key with where it came from and the closest known key, any other value by the
    name it was given as (a recipe or --set key, or a flag)."""
    parts = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            described = model.model_fields[key].description
            parts.append(
                f"{_flag(model, key)} is required" + (f" ({described})" if described else "")
            )
        elif err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(model.model_fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            parts.append(f"{sources.get(key, 'config')}: unknown key {key!r}{hint}")
        else:
            where = sources.get(key)
            name = f"{where} {key}" if where else _flag(model, key) if key else ""
            rest = ".".join(str(p) for p in err["loc"][1:])
            name += f".{rest}" if rest else ""
            parts.append(f"{name}: {message}" if name else message)
    return "invalid configuration: " + "; ".join(parts)
