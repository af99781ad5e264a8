"""Pickles with the record structure of NVlabs/edm's `torch_utils.persistence`, made without NVIDIA
code: each network module becomes `_reconstruct_persistent_obj(meta)` with meta = {type, version,
module_src, class_name, state}, ModuleDicts stay plain, tensors are pickled as torch does."""

from __future__ import annotations

import io
import pickle
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from disback_cli.models.networks import NetworkSpec, build_denoiser

HARMLESS_SOURCE = "# module source would be here; disback never runs it\n"

TINY_SONG = dict(
    model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1
)
ARCHS = {
    "ddpmpp": (
        "SongUNet",
        dict(
            embedding_type="positional",
            encoder_type="standard",
            decoder_type="standard",
            channel_mult_noise=1,
            resample_filter=[1, 1],
            **TINY_SONG,
        ),
    ),
    "ncsnpp": (
        "SongUNet",
        dict(
            embedding_type="fourier",
            encoder_type="residual",
            decoder_type="standard",
            channel_mult_noise=2,
            resample_filter=[1, 3, 3, 1],
            **TINY_SONG,
        ),
    ),
    "adm": (
        "DhariwalUNet",
        dict(
            model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1
        ),
    ),
}


def tiny_network(
    arch: str,
    precond: str,
    label_dim: int = 0,
    augment_dim: int = 0,
    channels=3,
    resolution=8,
    **overrides: Any,
):
    """Our network with EDM's structure, weights randomised so zero-initialised layers count."""
    model_type, kwargs = ARCHS[arch]
    kwargs = {**kwargs, **overrides}
    spec = NetworkSpec(
        arch=model_type,
        arch_kwargs={**kwargs, "augment_dim": augment_dim},
        precond=precond,
        data_shape=(channels, resolution, resolution),
        label_dim=label_dim,
    )
    torch.manual_seed(0)
    net = build_denoiser(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    init_kwargs = dict(
        img_resolution=resolution,
        img_channels=channels,
        label_dim=label_dim,
        use_fp16=False,
        model_type=model_type,
        augment_dim=augment_dim,
        **kwargs,
    )
    return net.eval(), init_kwargs


def _fake_persistence() -> tuple[types.ModuleType, types.ModuleType]:
    package = types.ModuleType("torch_utils")
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # only referenced by name in the pickle
        raise AssertionError("a safe loader never calls this")

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    return package, module


def edm_pickle_bytes(
    payload: Any,
    top: nn.Module,
    init_kwargs: dict,
    module_src: str = HARMLESS_SOURCE,
    class_name: str | None = None,
    protocol: int = pickle.HIGHEST_PROTOCOL,
) -> bytes:
    """Pickle `payload` (a snapshot dict or the network) the way EDM's persistence would."""
    package, fake = _fake_persistence()
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules["torch_utils"], sys.modules["torch_utils.persistence"] = package, fake

    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if not isinstance(obj, nn.Module) or isinstance(obj, nn.ModuleDict):
                return NotImplemented
            state = dict(obj.__dict__)
            state["_init_args"] = ()
            state["_init_kwargs"] = dict(init_kwargs) if obj is top else {}
            name = class_name if (obj is top and class_name) else type(obj).__name__
            meta = dict(
                type="class", version=6, module_src=module_src, class_name=name, state=state
            )
            return (fake._reconstruct_persistent_obj, (meta,))

    try:
        buffer = io.BytesIO()
        Pickler(buffer, protocol=protocol).dump(payload)
        return buffer.getvalue()
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def write_edm_snapshot(path: Path, net: nn.Module, init_kwargs: dict, **kwargs) -> Path:
    """An EDM training snapshot: {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}."""
    payload = dict(
        ema=net,
        loss_fn=None,
        augment_pipe=None,
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset"),
    )
    path.write_bytes(edm_pickle_bytes(payload, net, init_kwargs, **kwargs))
    return path
