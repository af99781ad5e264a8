"""Command-line options made from the config fields they set, so that each option is declared
once, as its config field: name, help text, choices, bounds and default come from the field.

`config_command(Model, "table")` turns a command function whose first parameter is `cfg` into a
Typer command with one option per field of `Model` (a field's `flags` metadata renames its flag
or, empty, leaves it to recipes and `--set`), plus `--config` and `--set`. The function is called
with the config built from defaults < recipe < flags (`config.build_config`) and with its own
parameters, which keep their own Typer declarations; a parameter named `recipe` is given the
command's `Recipe` instead of an option.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from disback_cli.config import LOSS_NAMES, field_flags
from disback_cli.config.recipes import build_config
from disback_cli.config.teacher_kinds import defaults_by_kind
from disback_cli.errors import ConfigError

KEYWORD = inspect.Parameter.KEYWORD_ONLY
TRAILING = ("force", "json_out", "quiet")  # the command's own options listed after the fields

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML recipe; flags override its values.")
]


@dataclass(frozen=True)
class Recipe:
    """The recipe a command was given (`path`, None without --config), and its config rebuilt
    over a recipe table found elsewhere (`over(where, table)`: flags and --set still win), for a
    command whose recipe defaults to one a run recorded."""

    path: Path | None
    over: Callable[[str, dict[str, Any]], Any]


def unwrap(annotation: Any) -> Any:
    """A field's type without its Annotated bounds and without `| None`."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return unwrap(args[0])
    return annotation


def literal_values(annotation: Any) -> list[str] | None:
    """The choices of a Literal field (or of the items of a list of them)."""
    kind = unwrap(annotation)
    if typing.get_origin(kind) is list:
        kind = unwrap(typing.get_args(kind)[0])
    if typing.get_origin(kind) is Literal:
        return [str(v) for v in typing.get_args(kind)]
    return None


def choices(model: type, field: str) -> str | None:
    """The metavar listing a config field's choices, e.g. `<even|distance>` (the values are
    checked by the config model, so recipes and flags get the same message)."""
    values = literal_values(model.model_fields[field].annotation)
    if field == "loss":
        values = list(LOSS_NAMES)
    return None if values is None else "<" + "|".join(values) + ">"


def _shown(value: Any) -> str:
    """A default as `--help` prints it: numbers short, pairs as the flag takes them."""
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(model: type, field: str) -> str:
    """Help text of a config field with its default (by teacher family where the families set
    it), so flags and recipes share one source."""
    info = model.model_fields[field]
    if info.is_required():
        return f"{info.description} (required)"
    resolved = getattr(model, "resolved_by_teacher", False)
    by_family = defaults_by_kind(field) if resolved else {}
    if by_family:
        shown = ", ".join(f"{_shown(value)} {kind}" for kind, value in by_family.items())
        return f"{info.description} [default by teacher: {shown}]"
    default = info.get_default(call_default_factory=True)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    shown = extra.get("default_text", "none" if default is None else default)
    return f"{info.description} [default: {shown}]"


def _option_type(kind: Any) -> Any:
    """The type Typer parses a field's flag as (choices and JSON objects arrive as text)."""
    if typing.get_origin(kind) is Literal or typing.get_origin(kind) is dict or kind is dict:
        return str
    if typing.get_origin(kind) is list:
        return list[_option_type(unwrap(typing.get_args(kind)[0]))]
    return kind


def _field_parameter(model: type, name: str) -> inspect.Parameter | None:
    """The Typer option of one config field, or None for a field left to recipes and --set."""
    field = model.model_fields[name]
    kind = unwrap(field.annotation)
    flags = field_flags(model, name)
    if flags == []:
        return None
    help_text = describe(model, name)
    if typing.get_origin(kind) is list:
        help_text += " (repeatable)"
    if typing.get_origin(kind) is dict or kind is dict:
        help_text += " (JSON)"
    if kind is bool:
        dashed = name.replace("_", "-")
        flags = flags or (
            [f"--{dashed}"] if name.startswith("no_") else [f"--{dashed}/--no-{dashed}"]
        )
        option = typer.Option(*flags, metavar="", help=help_text, show_default=False)
    else:
        flags = flags or [f"--{name.replace('_', '-')}"]
        metavar = choices(model, name)
        option = typer.Option(*flags, metavar=metavar, help=help_text, show_default=False)
    annotation = Annotated[_option_type(kind) | None, option]
    return inspect.Parameter(name, KEYWORD, default=None, annotation=annotation)


def _as_config_values(model: type, values: dict[str, Any]) -> dict[str, Any]:
    """Flag values as config values: JSON objects parsed (with a one-line refusal)."""
    for name, value in values.items():
        kind = unwrap(model.model_fields[name].annotation)
        if value is None or not (typing.get_origin(kind) is dict or kind is dict):
            continue
        flag = "--" + name.replace("_", "-")
        try:
            values[name] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{flag} is not valid JSON ({exc})") from None
        if not isinstance(values[name], dict):
            raise ConfigError(f"{flag} must be a JSON object, e.g. '{{\"hidden\": 32}}'")
    return values


def _fields_in_order(model: type) -> list[str]:
    """A config's fields, its own first and those it shares with other commands last."""
    ordered: list[str] = []
    for cls in model.__mro__:
        own = [n for n in getattr(cls, "__annotations__", {}) if n in model.model_fields]
        ordered += [n for n in own if n not in ordered]
    return ordered


def _set_option(model: type) -> Any:
    """`--set KEY=VALUE`, with an example key of this config (one without a flag, if any)."""
    names = list(model.model_fields)
    fallback = "batch" if "batch" in names else names[0]
    example = next((n for n in names if field_flags(model, n) == []), fallback)
    value = model.model_fields[example].get_default(call_default_factory=True)
    return Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help=f"Any config key, also those without a flag (e.g. --set {example}={value}); "
            "repeatable.",
        ),
    ]


def config_command(model: type, table: str) -> Callable[[Callable], Callable]:
    """Decorate a command `fn(cfg, **own)`: its options are `own`'s, one per field of `model`,
    `--config` and `--set` (see the module docstring)."""

    def decorate(fn: Callable) -> Callable:
        declared = inspect.signature(fn).parameters
        own = [p for name, p in declared.items() if name not in ("cfg", "recipe")]
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints[p.name], kind=KEYWORD) for p in own]
        fields = [_field_parameter(model, name) for name in _fields_in_order(model)]
        fields = [p for p in fields if p is not None]
        common = [
            inspect.Parameter("config", KEYWORD, default=None, annotation=ConfigOpt),
            inspect.Parameter("settings", KEYWORD, default=None, annotation=_set_option(model)),
        ]
        leading = [p for p in own if p.name not in TRAILING]
        trailing = [p for p in own if p.name in TRAILING]
        parameters = [*leading, *fields, *common, *trailing]
        field_names = {p.name for p in fields}

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            flags = _as_config_values(model, {k: kwargs.pop(k) for k in field_names})
            recipe, settings = kwargs.pop("config"), kwargs.pop("settings")
            cfg = build_config(model, recipe, table, flags, settings)
            if "recipe" in declared:
                kwargs["recipe"] = Recipe(
                    recipe,
                    lambda where, values: build_config(
                        model, None, table, flags, settings, layer=(where, values)
                    ),
                )
            return fn(cfg, **kwargs)

        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        del command.__wrapped__  # Typer must read the signature above, not `fn`'s
        return command

    return decorate
