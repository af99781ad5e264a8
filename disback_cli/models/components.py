"""Networks of other libraries (transformers, diffusers) built from configs anyone may write:
the config's numbers, lists and nesting are bounded, and the network is built once on the meta
device, counted and matched against its weights, before any memory is allocated for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from disback_cli.errors import DisbackError, summary_of

MAX_COMPONENT_PARAMETERS = 20 * 10**9  # text encoders, VAEs and CLIP models are far smaller
# A component config is data from a file: its numbers, lists and nesting are bounded before a
# network is built from it (a million-layer encoder must be refused, not built).
MAX_CONFIG_INT, MAX_CONFIG_ITEMS, MAX_CONFIG_DEPTH, MAX_LAYERS = 1 << 24, 512, 6, 256
LAYER_KEYS = ("num_hidden_layers", "layers_per_block", "num_attention_heads", "num_layers")


def bounded_config(config: dict[str, Any], where: Path, what: str) -> dict[str, Any]:
    """`config` if every value in it is of a size a real model's config has, else a refusal."""

    def check(value: Any, path: str, depth: int) -> None:
        if depth > MAX_CONFIG_DEPTH:
            raise DisbackError(f"{where}: the {what} config is nested too deeply at {path}")
        if isinstance(value, bool) or value is None or isinstance(value, float | str):
            return
        if isinstance(value, int):
            limit = MAX_LAYERS if path.rsplit(".", 1)[-1] in LAYER_KEYS else MAX_CONFIG_INT
            if abs(value) > limit:
                raise DisbackError(f"{where}: {what} config {path} = {value} is too large")
            return
        items = value.items() if isinstance(value, dict) else enumerate(value)
        if not isinstance(value, dict | list) or len(value) > MAX_CONFIG_ITEMS:
            raise DisbackError(f"{where}: {what} config {path} is not a small JSON value")
        for key, item in items:
            check(item, f"{path}.{str(key)[:40]}", depth + 1)

    check(config, what.replace(" ", "_"), 0)
    return config


def build_checked(
    build, where: Path, what: str, tensors: dict[str, torch.Tensor] | None = None
) -> torch.nn.Module:
    """`build()` once on the meta device to count its parameters (and, given the `tensors` of
    its weights file, to match their names and shapes), then for real: a config from a file that
    asks for an absurd network, or for another one than its weights, is refused in one line
    before any memory is allocated."""
    try:
        with torch.device("meta"):
            template = build()
    except Exception as exc:  # a config anyone may write
        first = summary_of(exc)
        raise DisbackError(f"{where}: the {what} config does not build ({first})") from None
    count = sum(p.numel() for p in template.parameters())
    if count > MAX_COMPONENT_PARAMETERS:
        raise DisbackError(f"{where}: the {what} config asks for {count:,} parameters")
    if tensors is not None:
        expected = {k: tuple(v.shape) for k, v in template.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items() if k in expected}
        missing = sorted(set(expected) - set(tensors))
        if missing or found != expected:
            wrong = missing[:1] or [k for k in found if found[k] != expected[k]][:1]
            raise DisbackError(f"{where}: the {what} weights do not fit its config (e.g. {wrong})")
    with torch.random.fork_rng(devices=[]):  # initialisation must not move the global stream
        return build()
